import json

import numpy as np
import pytest
import torch

import checkpoint
import config
import data
import sft
import toy

TINY = ["--hidden-size=32", "--num-hidden-layers=2", "--num-attention-heads=2", "--kv-lora-rank=16",
        "--qk-nope-head-dim=8", "--qk-rope-head-dim=8", "--v-head-dim=8", "--intermediate-size=64",
        "--moe-intermediate-size=32", "--n-routed-experts=4", "--threads=1", "--seq-len=32", "--batch-size=8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    docs = list(toy.toy_corpus(3000, seed=0))
    (d / "corpus.txt").write_text("<|endoftext|>".join(docs) + "<|endoftext|>")
    tok = toy.toy_tokenizer(n_docs=2000)
    tok.save(str(d / "tok.bpe"))
    with open(d / "pairs.jsonl", "w") as f:
        for p in toy.toy_problems(200):
            f.write(json.dumps({"prompt": data.apply_template(data.TOY_TEMPLATE, p.prompt),
                                "completion": f"<think></think><answer>{p.answer}</answer>"}) + "\n")
    return d, tok


def test_pair_batch_masks_prompt_tokens():
    rows = [([1, 2, 3], [7, 8, 0]), ([4], [9, 0])]  # (prompt ids, completion ids + end-of-text id 0)
    x, y, m, valid = sft.pair_batch(rows, 2, 64, np.random.default_rng(0))
    for b in range(2):
        i = [r for r in rows if r[0][0] == int(x[b, 0])][0]
        P, C = len(i[0]), len(i[1])
        seq = i[0] + i[1]
        assert x[b, :P + C - 1].tolist() == seq[:-1] and y[b, :P + C - 1].tolist() == seq[1:]
        # the loss sees exactly the completion tokens and the end-of-text: targets y[t] for t >= P-1
        assert y[b][m[b]].tolist() == i[1]
        assert m[b].sum() == C  # padding (id 0, the same as end-of-text) is never in the mask (P3)
        assert valid[b].sum() == P + C - 1 and valid[b, :P + C - 1].all()


def test_text_batch_windows_are_shifted_by_one():
    ids = np.arange(100)
    x, y, m, _ = sft.text_batch(ids, 4, 10, np.random.default_rng(0))
    assert torch.equal(y, x + 1) and m.all() and x.shape == (4, 10)


def test_pretraining_lowers_held_out_loss_and_resume_is_exact(files, tmp_path, monkeypatch):
    d, _ = files
    args = [f"--data={d / 'corpus.txt'}", f"--tokenizer={d / 'tok.bpe'}", "--lr=3e-3", "--warmup-steps=5",
            "--eval-every=40", "--eval-batches=4", "--log-every=40", *TINY]
    sft.main(args + [f"--out-dir={tmp_path / 'full'}", "--max-steps=40", "--ckpt-every=20"])
    rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    first = rows[0]["loss"]
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    assert val and val[-1] < 0.6 * first, (first, val)  # learning shows on held-out text
    save = checkpoint.save_checkpoint

    def crash_after_first_save(*a, **k):  # the process dies right after writing step 20
        save(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        sft.main(args + [f"--out-dir={tmp_path / 'part'}", "--max-steps=40", "--ckpt-every=20"])
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert checkpoint.load_checkpoint(str(tmp_path / "part"))["step"] == 20
    resumed = sft.main(args + [f"--out-dir={tmp_path / 'part'}", "--max-steps=40", "--ckpt-every=20", "--resume"])
    full = checkpoint.load_checkpoint(str(tmp_path / "full"))
    part = checkpoint.load_checkpoint(str(tmp_path / "part"))
    for k, v in full["model"].items():
        assert torch.equal(v, part["model"][k]), k
    assert torch.equal(resumed.lm_head.weight, full["model"]["lm_head.weight"])


def test_sft_on_pairs_learns_the_completion_format(files, tmp_path):
    d, tok = files
    model = sft.main([f"--data={d / 'pairs.jsonl'}", f"--tokenizer={d / 'tok.bpe'}", f"--out-dir={tmp_path}",
                      "--max-steps=60", "--lr=3e-3", "--warmup-steps=3", "--eval-every=60", *TINY])
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["val_loss"] < 0.6 * rows[0]["loss"]  # the format tokens are learned; the sums are not yet
    assert (tmp_path / "final" / "config.json").exists() and (tmp_path / "final" / "tokenizer.bpe").exists()


def test_bad_input_names_file_and_line(files, tmp_path):
    d, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: field 'completion'"):
        sft.main([f"--data={bad}", f"--tokenizer={d / 'tok.bpe'}", f"--out-dir={tmp_path / 'o'}", *TINY])
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: malformed JSON"):
        sft.main([f"--data={bad}", f"--tokenizer={d / 'tok.bpe'}", f"--out-dir={tmp_path / 'o'}", *TINY])
    with pytest.raises(config.ConfigError, match="--data: .*no such file"):
        sft.main([f"--data={tmp_path / 'missing.txt'}", f"--tokenizer={d / 'tok.bpe'}"])
    with pytest.raises(config.ConfigError, match="--resume: no checkpoint"):
        sft.main([f"--data={d / 'corpus.txt'}", f"--tokenizer={d / 'tok.bpe'}", f"--out-dir={tmp_path / 'x'}",
                  "--resume"])


def test_empty_prompt_and_reused_out_dir_are_refused(files, tmp_path):
    d, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "", "completion": "b"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: field 'prompt' is empty"):
        sft.main([f"--data={bad}", f"--tokenizer={d / 'tok.bpe'}", f"--out-dir={tmp_path / 'o'}", *TINY])
    args = [f"--data={d / 'corpus.txt'}", f"--tokenizer={d / 'tok.bpe'}", f"--out-dir={tmp_path / 'run'}",
            "--max-steps=2", *TINY]
    sft.main(args)
    with pytest.raises(config.ConfigError, match="holds checkpoints of an earlier run: add --resume"):
        sft.main(args)


def test_single_process_bf16_keeps_fp32_master_weights(files, tmp_path):
    """bf16 compute (autocast) over fp32 weights: a tiny lr still moves every weight (bf16 weights would not)."""
    d, _ = files
    model = sft.main([f"--data={d / 'corpus.txt'}", f"--tokenizer={d / 'tok.bpe'}", f"--out-dir={tmp_path}",
                      "--max-steps=1", "--dtype=bf16", "--lr=1e-6", "--warmup-steps=0", "--weight-decay=0", *TINY])
    import torch
    from model import ModelConfig, Transformer
    torch.manual_seed(1337)  # sft's seed: the same initial weights
    init = Transformer(model.config)
    assert next(model.parameters()).dtype == torch.float32
    moved = [(p != q).float().mean().item() for (n, p), q in zip(model.named_parameters(), init.parameters())
             if p.dim() >= 2 and not any(k in n for k in ("experts", "gate", "embed"))]  # (rows that got gradient)
    assert min(moved) > 0.5
