"""The reward model: sft.py --objective=preference (Bradley-Terry on prompt/chosen/rejected rows, the reward read off
the LM head's end-of-text row at each sequence's own last position)."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import checkpoint
import config
import data
import hf
import reward_model
import sft
from model import ModelConfig, Transformer

TINY = ["--hidden-size=32", "--num-hidden-layers=2", "--num-attention-heads=2", "--kv-lora-rank=16",
        "--qk-nope-head-dim=8", "--qk-rope-head-dim=8", "--v-head-dim=8", "--intermediate-size=64",
        "--moe-intermediate-size=32", "--n-routed-experts=4", "--threads=1", "--seq-len=48"]
WORDS = "apple river stone cloud green table music light paper window garden silver orange forest bread".split()


def please_rows(n, seed=0):
    """The hidden rule: of two random four-word responses, the chosen one has "please" in place of one word (the
    same number of words, so neither length nor position gives it away). The model is never told the rule."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        good, bad = ([rng.choice(WORDS) for _ in range(4)] for _ in range(2))
        good[rng.randrange(4)] = "please"
        rows.append({"prompt": f"Write about {rng.choice(WORDS)}.", "chosen": " ".join(good),
                     "rejected": " ".join(bad)})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    rows = please_rows(500)
    (d / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = data.Tokenizer.train([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], 300,
                               specials=["<|endoftext|>"])
    tok.save(str(d / "tok.bpe"))
    return d, tok


def args(d, out, *more):
    return ["--objective=preference", f"--data={d / 'prefs.jsonl'}", f"--tokenizer={d / 'tok.bpe'}",
            f"--out-dir={out}", "--val-frac=0.2", "--batch-size=16", "--lr=3e-3", "--warmup-steps=5", *TINY, *more]


def metric_rows(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    for r in rows:
        r.pop("pairs_per_s")  # wall-clock
    return rows


def test_bradley_terry_loss_and_gradient_match_a_hand_computation():
    rc = torch.tensor([0.3, -1.2, 2.0, 0.5, -30.0, 40.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([0.1, 0.4, -3.0, 0.5, 15.0, -2.0], dtype=torch.float64, requires_grad=True)
    loss, right = reward_model.bt_loss_sum(rc, rr)
    loss.backward()
    d = [a - b for a, b in zip(rc.tolist(), rr.tolist())]
    # -log sigmoid(d) = log(1 + e^-d); its derivative in d is -1 / (1 + e^d): r_chosen gets it, r_rejected its negative
    assert abs(loss.item() - sum(math.log1p(math.exp(-x)) for x in d)) < 1e-12
    want = torch.tensor([-1 / (1 + math.exp(x)) for x in d], dtype=torch.float64)
    assert torch.allclose(rc.grad, want, rtol=0, atol=1e-15) and torch.allclose(rr.grad, -want, rtol=0, atol=1e-15)
    assert right == 3  # 0.3 > 0.1, 2 > -3, 40 > -2; the tie 0.5 = 0.5 counts as wrong
    assert loss.item() > 45 and math.isfinite(loss.item())  # d = -45 costs 45, not inf


def test_reward_is_the_eot_logit_at_each_rows_own_last_position():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                    intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                    initializer_range=0.2)).double().eval()
    eot = 0  # the same id as the padding: the last position must come from the length (P3)
    seqs = [[5, 0, 7, 9, 0], [3, 0], [9, 8, 7, 6, 5, 4, 3, 2, 0], [0], [11, 0, 0]]
    with torch.no_grad():
        got = reward_model.reward_scores(model, seqs, eot)
        alone = [(model(torch.tensor([s]), return_hidden=True)[0, -1] @ model.lm_head.weight[eot]).item()
                 for s in seqs]  # each row scored by itself: no padding at all
        x, valid = reward_model.pad_right(seqs)
        x2 = torch.where(valid, x, torch.randint(1, 64, x.shape))  # other padding tokens
        other = reward_model.seq_rewards(model, x2, valid, eot)
    assert got.dtype == torch.float32 and got.shape == (5,)
    # fp32 rewards (the product is taken in fp32) against the fp64 model's own: equal to fp32 rounding
    assert torch.allclose(got.double(), torch.tensor(alone, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.allclose(other, got, rtol=0, atol=1e-6)
    assert len({round(v, 6) for v in alone}) == 5  # five different scores: a wrong position would show


def test_long_pairs_keep_their_head_and_end_in_eot(files, tmp_path):
    assert reward_model.reward_seq([1, 2, 3], [4, 5, 6], 0, 7) == [1, 2, 3, 4, 5, 6, 0]  # fits exactly
    assert reward_model.reward_seq([1, 2, 3], [4, 5, 6], 0, 6) == [1, 2, 3, 4, 5, 0]  # first T - 1 tokens, then eot
    d, tok = files
    c = config.parse_config(sft.SFTConfig, ["--seq-len=12"])
    rows = sft.load_prefs(str(d / "prefs.jsonl"), tok, c)
    assert all(len(s) <= 12 and s[-1] == tok.eot_id for pair in rows for s in pair)
    first = json.loads(open(d / "prefs.jsonl").readline())
    full = data.prompt_ids(tok, first["prompt"]) + tok.encode(first["chosen"])
    assert len(full) >= 12 and rows[0][0] == full[:11] + [tok.eot_id]


def test_reward_model_learns_a_hidden_rule(files, tmp_path):
    d, tok = files
    model = sft.main(args(d, tmp_path, "--max-steps=60", "--eval-every=60"))
    rows = metric_rows(tmp_path)
    assert rows[-1]["val_accuracy"] >= 0.9 and rows[-1]["val_loss"] < 0.2, rows[-1]
    assert abs(rows[0]["loss"] - math.log(2)) < 0.01  # a new model starts at chance: rewards near 0
    # the same held-out pairs scored by the step-0 model: near chance, so the rule was learned, not given
    c = config.parse_config(sft.SFTConfig, args(d, tmp_path))
    val = sft.load_prefs(c.data, tok, c)[400:]  # val_frac 0.2 of 500: the last 100 rows
    torch.manual_seed(c.seed)  # sft's seed: the same initial weights
    init = Transformer(model.config)
    with torch.no_grad():
        for m, lo, hi in ((init, 0.3, 0.7), (model, 0.9, 1.0)):
            r = reward_model.reward_scores(m, [s for pair in val for s in pair], tok.eot_id).view(-1, 2)
            acc = (r[:, 0] > r[:, 1]).float().mean().item()
            assert lo <= acc <= hi, (acc, lo, hi)


def test_export_scores_the_same_and_resume_is_exact(files, tmp_path, monkeypatch):
    d, tok = files
    a = args(d, tmp_path / "full", "--max-steps=20", "--ckpt-every=10", "--eval-every=5")
    model = sft.main(a)
    seqs = [s for pair in sft.load_prefs(str(d / "prefs.jsonl"), tok, config.parse_config(sft.SFTConfig, a))[:8]
            for s in pair]
    with torch.no_grad():
        want = reward_model.reward_scores(model, seqs, tok.eot_id)
        for m in (hf.load(str(tmp_path / "full" / "final")), checkpoint.load_model(str(tmp_path / "full")),
                  checkpoint.load_model(checkpoint.latest_checkpoint(str(tmp_path / "full")))):
            assert torch.equal(reward_model.reward_scores(m, seqs, tok.eot_id), want)
    assert want.std() > 0.1  # a trained model: scores differ, so equality says something

    save = checkpoint.save_checkpoint

    def crash_after_first_save(*a, **k):  # the process dies right after writing step 10
        save(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_first_save)
    b = args(d, tmp_path / "part", "--max-steps=20", "--ckpt-every=10", "--eval-every=5")
    with pytest.raises(KeyboardInterrupt):
        sft.main(b)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert len(metric_rows(tmp_path / "part")) == 10
    resumed = sft.main(b + ["--resume"])
    assert metric_rows(tmp_path / "part") == metric_rows(tmp_path / "full")  # loss, accuracy, val_*, grad_norm
    for (k, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), k


def test_step_loss_is_the_mean_over_all_its_pairs(files, tmp_path):
    """16 pairs in one micro-batch, or the same 16 in two of 8: the same loss, accuracy and gradient."""
    d, _ = files
    sft.main(args(d, tmp_path / "one", "--max-steps=3", "--eval-every=3"))
    sft.main(args(d, tmp_path / "two", "--max-steps=3", "--eval-every=3", "--batch-size=8", "--grad-accum=2"))
    for x, y in zip(metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and x["accuracy"] == y["accuracy"], (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-5 * x["grad_norm"], (x, y)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_ranks_equal_one_process(files, tmp_path):
    """FSDP2 on 2 gloo ranks (batch 4 each) against one process (batch 8): the normaliser counts every rank's
    pairs, and the LM head row read after the forward is the whole row (about 15 s: torchrun starts 2 processes)."""
    d, _ = files
    a = [x for x in args(d, "x", "--max-steps=4", "--eval-every=2", "--eval-batches=2", "--lr-schedule=constant")
         if not x.startswith(("--out-dir", "--batch-size"))]
    sft.main(a + [f"--out-dir={tmp_path / 'one'}", "--batch-size=8"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "sft.py", *a, f"--out-dir={tmp_path / 'two'}", "--batch-size=4"], cwd=root, timeout=150,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    assert len(one) == len(two) == 4
    for x, y in zip(one, two):
        for k in ("loss", "grad_norm", "accuracy", "val_loss", "val_accuracy"):
            assert (x.get(k) is None) == (y.get(k) is None) and abs((x.get(k) or 0) - (y.get(k) or 0)) < 1e-5, k


def test_bad_rows_and_settings_are_refused_by_name(files, tmp_path):
    d, _ = files
    bad = tmp_path / "bad.jsonl"
    base = [f"--tokenizer={d / 'tok.bpe'}", f"--out-dir={tmp_path / 'o'}", "--objective=preference", *TINY]
    for text, msg in [
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
         r"bad.jsonl:2: field 'rejected' missing or not a string"),
        ('{"prompt": "a", "chosen": 3, "rejected": "c"}\n', r"bad.jsonl:1: field 'chosen' missing or not a string"),
        ('{"chosen": "b", "rejected": "c"}\n', r"bad.jsonl:1: field 'prompt' missing or not a string"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b", "rejected": ""}\n',
         r"bad.jsonl:3: field 'rejected' is empty"),
        ('{"prompt": "a", "chosen": "", "rejected": "c"}\n', r"bad.jsonl:1: field 'chosen' is empty"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n[1, 2]\n', r"bad.jsonl:2: expected a JSON object"),
    ]:
        bad.write_text(text)
        with pytest.raises(data.DataError, match=msg):
            sft.main([f"--data={bad}", *base])
    bad.write_text('{"prompt": "a", "good": "b", "rejected": "c"}\n')  # field names are flags
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: field 'worse' missing"):
        sft.main([f"--data={bad}", "--chosen-field=good", "--rejected-field=worse", *base])
    text = tmp_path / "c.txt"
    text.write_text("some raw text")
    with pytest.raises(config.ConfigError, match=r"--data: .*c.txt: --objective=preference reads a .jsonl"):
        sft.main([f"--data={text}", *base])
    with pytest.raises(config.ConfigError, match=r"--val-data: .*c.txt: --objective=preference reads a .jsonl"):
        sft.main([f"--data={d / 'prefs.jsonl'}", f"--val-data={text}", *base])
    with pytest.raises(config.ConfigError, match="--objective"):
        sft.main([f"--data={d / 'prefs.jsonl'}", *base, "--objective=dpo"])
