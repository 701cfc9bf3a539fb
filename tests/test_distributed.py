"""torchrun + FSDP2 on 2 CPU processes (gloo): the same update as one process, sharded checkpoints that resume
exactly, generation under FSDP, and an exported Hugging Face directory that loads in one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import config
import hf
import toy
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def torchrun(*args, n=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def test_grpo_step_and_generation_match_one_process(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import dist_worker
    torchrun("tests/dist_worker.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = dist_worker.reference(tmp_path)
    for agg, want in ref["aggs"].items():  # every loss aggregation (P8)
        for got in (ranks[0]["aggs"][agg], ranks[1]["aggs"][agg]):
            assert abs(got["loss"] - want["loss"]) < 1e-6, agg
            assert abs(got["grad_norm"] - want["grad_norm"]) < 1e-5, agg
        got = ranks[0]["aggs"][agg]["params"]
        assert set(got) == set(want["params"])  # the gathered full state dict lands on rank 0
        # AdamW at lr 1e-2 moves a weight by up to ~1e-2, and where a gradient cancels to ~0 the move follows the
        # rounding of the sum, whose order differs (micro-batches are cut by length per rank; the all-reduce):
        # 5e-5 is 0.5% of a step. A missing or doubled gradient is off by ~1e-2; loss and grad norm are checked above
        for k, v in want["params"].items():
            assert (got[k] - v).abs().max() < 5e-5, (agg, k)
    assert len({round(ref["aggs"][a]["loss"], 6) for a in dist_worker.AGGS}) == 3  # three different normalisers
    assert ref["aggs"]["skip_rank1"]["grad_norm"] > 0 and ref["aggs"]["skip_all"]["grad_norm"] == 0
    # rank r generated prompts r, r+2 (different lengths and stops: different numbers of decode steps per rank)
    assert ranks[0]["tokens"] == ref["tokens"][0::2] and ranks[1]["tokens"] == ref["tokens"][1::2]


TINY = ["--hidden-size=32", "--num-hidden-layers=2", "--num-attention-heads=2", "--kv-lora-rank=16",
        "--qk-nope-head-dim=8", "--qk-rope-head-dim=8", "--v-head-dim=8", "--intermediate-size=64",
        "--moe-intermediate-size=32", "--n-routed-experts=4", "--threads=1", "--seq-len=32", "--lr=3e-3",
        "--warmup-steps=0", "--lr-schedule=constant", "--log-every=1", "--eval-every=2", "--eval-batches=2",
        "--ckpt-every=2"]


def test_sft_two_ranks_equal_one_rank_and_dcp_resume_is_exact(tmp_path):
    import sft
    docs = list(toy.toy_corpus(2000, seed=0))
    (tmp_path / "c.txt").write_text("<|endoftext|>".join(docs) + "<|endoftext|>")
    toy.toy_tokenizer(n_docs=500).save(str(tmp_path / "tok.bpe"))
    args = [f"--data={tmp_path / 'c.txt'}", f"--tokenizer={tmp_path / 'tok.bpe'}", *TINY]
    # one process, batch 8 per step
    one = sft.main(args + [f"--out-dir={tmp_path / 'one'}", "--batch-size=8", "--max-steps=4"])
    # two ranks, batch 4 each: the same global batch
    torchrun("sft.py", *args, f"--out-dir={tmp_path / 'two'}", "--batch-size=4", "--max-steps=4")
    # two ranks, stopped after the step-2 checkpoint, resumed on two ranks
    torchrun("sft.py", *args, f"--out-dir={tmp_path / 'res'}", "--batch-size=4", "--max-steps=2")
    assert os.path.isdir(tmp_path / "res" / "ckpt_0000002")  # a DCP directory, not a single file
    torchrun("sft.py", *args, f"--out-dir={tmp_path / 'res'}", "--batch-size=4", "--max-steps=4", "--resume")

    m1 = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
    m2 = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert abs(m1[-1]["val_loss"] - m2[-1]["val_loss"]) < 1e-5
    # the exported HF directories load in one process; the 2-rank model equals the 1-rank model
    two = hf.load(str(tmp_path / "two" / "final")).eval()
    res = hf.load(str(tmp_path / "res" / "final")).eval()
    tokens = torch.randint(0, 200, (2, 17))
    with torch.no_grad():
        ref = one.eval()(tokens)
        assert (two(tokens) - ref).abs().max() < 1e-4
        assert torch.equal(res(tokens), two(tokens))  # resume on the same world size: bit-identical


def test_resume_refuses_another_world_size(tmp_path, monkeypatch):
    d = tmp_path / "ckpt_0000002"
    d.mkdir()
    torch.save({"world_size": 2, "step": 2}, d / "extra_rank0.pt")
    with pytest.raises(config.ConfigError, match="written by 2 ranks"):
        checkpoint.load_checkpoint(str(tmp_path))


def test_grpo_and_eval_entry_points_under_torchrun(tmp_path):
    """grpo.py on 2 ranks runs, checkpoints (DCP) and resumes; eval.py on 2 ranks equals 1 process, sampling."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import dist_worker
    import eval as ev
    tok = toy.toy_tokenizer(n_docs=500)
    base = tmp_path / "base"
    hf.save(dist_worker.tiny(vocab=64 * (tok.vocab_size // 64 + 1)), str(base))
    tok.save(str(base / "tokenizer.bpe"))
    g = ["grpo.py", "--preset=cpu", f"--init-from={base}", f"--out-dir={tmp_path / 'rl'}", "--rollout-prompts=4",
         "--group-size=4", "--max-new-tokens=6", "--eval-every=2", "--eval-prompts=8", "--task-size=64",
         "--threads=1", "--ckpt-every=1", "--beta=0.01"]
    torchrun("tests/dist_worker.py", "dynamic", str(base), str(tmp_path / "ds"))  # finishes: no hang
    calls = [torch.load(tmp_path / "ds" / f"calls{r}.pt") for r in range(2)]
    assert calls[0] == [4, 4] and calls[1] == [4]  # rank 0 refilled its 2 groups; rank 1 needed nothing
    torchrun(*g, "--max-steps=1")
    assert os.path.isdir(tmp_path / "rl" / "ckpt_0000001")
    torchrun(*g, "--max-steps=2", "--resume")
    rows = [json.loads(l) for l in open(tmp_path / "rl" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2] and "heldout_pass1" in rows[0] and "heldout_pass1" in rows[2]
    e = ["eval.py", f"--model={tmp_path / 'rl'}", "--task=toy", "--problems=6", "--k=2", "--temperature=1",
         "--template=toy", "--max-new-tokens=6", "--workers=0", "--threads=1"]
    torchrun(*e, f"--out-dir={tmp_path / 'e2'}")
    ev.main(e[1:] + [f"--out-dir={tmp_path / 'e1'}"])
    one, two = ([json.loads(l) for l in open(tmp_path / d / "instances.jsonl")] for d in ("e1", "e2"))
    assert [i["samples"] for i in one] == [i["samples"] for i in two] and len(two) == 6


def test_sft_bf16_mixed_precision_on_two_ranks(tmp_path):
    """--dtype=bf16 under FSDP: bf16 compute over fp32 master weights, fp32 gradient reduction; close to fp32."""
    docs = list(toy.toy_corpus(1000, seed=0))
    (tmp_path / "c.txt").write_text("<|endoftext|>".join(docs) + "<|endoftext|>")
    toy.toy_tokenizer(n_docs=500).save(str(tmp_path / "tok.bpe"))
    args = [f"--data={tmp_path / 'c.txt'}", f"--tokenizer={tmp_path / 'tok.bpe'}", *TINY, "--batch-size=4",
            "--max-steps=3", "--eval-every=3"]
    torchrun("sft.py", *args, f"--out-dir={tmp_path / 'fp32'}")
    torchrun("sft.py", *args, f"--out-dir={tmp_path / 'bf16'}", "--dtype=bf16")
    a, b = ([json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] for d in ("fp32", "bf16"))
    assert all(abs(x["loss"] - y["loss"]) < 0.05 for x, y in zip(a, b))
    assert a[0]["loss"] != b[0]["loss"]  # bf16 compute really ran
    final = hf.load(str(tmp_path / "bf16" / "final"))
    assert next(final.parameters()).dtype == torch.float32  # master weights stayed fp32


@pytest.mark.parametrize("kind", ["deepseek", "qwen3_tied"])
def test_sharded_load_reads_only_each_ranks_rows(tmp_path, kind):
    """Under torchrun a Hugging Face directory is read shard by shard (hf.load with FSDP applied to a meta model):
    each rank's parameters equal its rows of the one-process model, it read no other rows (an odd vocabulary of
    203 splits 102/101; 4 experts split 2/2), and the sharded forward gives the one-process logits. Its export,
    streamed by rank 0 into several files, loads in one process with the same logits."""
    if kind == "deepseek":
        cfg = ModelConfig(vocab_size=203, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
                          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
                          moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2)
    else:
        cfg = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=203, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, kv_lora_rank=None, qk_norm=True,
                          n_shared_experts=0, scoring_func="softmax", n_routed_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    one = Transformer(cfg).eval()
    with torch.no_grad():
        for m in one.moe_layers():
            if kind == "deepseek":
                m.gate.e_score_correction_bias.uniform_(0, 0.1)
    hf.save(one, str(tmp_path / "hf"))
    torchrun("tests/dist_worker.py", "load", str(tmp_path / "hf"), str(tmp_path))
    full = one.state_dict()
    with torch.no_grad():
        ref = one(torch.arange(24).view(2, 12) % 150)
    for r in range(2):
        got = torch.load(tmp_path / f"load{r}.pt", weights_only=False)
        assert got["tied"] == (kind == "qwen3_tied")
        assert (got["logits"] - ref).abs().max() < 1e-5
        for k, ((start, stop), t) in got["local"].items():
            assert torch.equal(t, full[k][start:stop]), k
        total = sum(v.numel() for k, v in full.items() if k != "lm_head.weight" or kind != "qwen3_tied")
        assert got["numbers_read"] < 0.52 * total  # its half of every tensor, not the whole files
        assert got["local"]["embed_tokens.weight"][0] == ((0, 102) if r == 0 else (102, 203))
        assert got["local"]["layers.1.mlp.experts.gate_proj"][0] == ((0, 2) if r == 0 else (2, 4))
    # the sharded model's streamed export: several files, loads in one process with the same logits
    assert len([f for f in os.listdir(tmp_path / "exported") if f.endswith(".safetensors")]) > 2
    with torch.no_grad():
        assert (hf.load(str(tmp_path / "exported"))(torch.arange(24).view(2, 12) % 150) -
                ref).abs().max() < 1e-5
