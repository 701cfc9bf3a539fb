"""Keeps bench/grpo_step.py from rotting: our side of it runs always, at a tiny size (2 prompts x G=2, 4 new
tokens); TRL's side only where TRL is installed (requirements-bench.txt; not in CI)."""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--prompts=2", "--group=2", "--new=4", "--reps=1"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_grpo_step", os.path.join(ROOT, "bench", "grpo_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = load_bench()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("tokenizers")
    d = str(tmp_path_factory.mktemp("grpo_step"))
    bench.write_checkpoint(d)
    return d


def test_our_timed_step_updates_the_policy_with_the_forced_length(hf_dir):
    a = bench.parse_args(TINY + ["--sides=ours"])
    s = bench.ours_setup(hf_dir, a, beta=0.04)
    assert s.tok.vocab_size == s.policy.config.vocab_size == bench.VOCAB  # one softmax support on both sides
    before = {k: v.clone() for k, v in s.policy.state_dict().items()}
    ref_before = {k: v.clone() for k, v in s.ref.state_dict().items()}
    times, b = bench.ours_step(s, 0)
    assert b.comp_len.tolist() == [4] * 4 and b.adv.abs().sum() > 0  # no stop: every row 4 tokens; random rewards
    changed = {k for k, v in s.policy.state_dict().items() if not torch.equal(v, before[k])}
    assert "lm_head.weight" in changed and "embed_tokens.weight" in changed
    assert any(".mlp.experts." in k for k in changed)  # the MoE trained too
    assert all(torch.equal(v, ref_before[k]) for k, v in s.ref.state_dict().items())  # the reference is frozen
    assert min(times.values()) > 0
    assert times["total"] == pytest.approx(times["generate"] + times["score"] + times["train"])


def test_ours_alone_runs_and_reports(hf_dir, capsys):
    a = bench.parse_args(TINY + ["--sides=ours"])
    results, info = bench.run(a, hf_dir)
    assert sorted(results) == [0.0, 0.04] and all(len(r["ours"]) == 1 for r in results.values())
    bench.report(a, results, info)
    out = capsys.readouterr().out
    assert "beta = 0.04" in out and "total" in out and "TRL" not in out.split("\n", 1)[1]


def test_trl_side_interleaved_with_ours(hf_dir, capsys, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = bench.parse_args(TINY + ["--betas=0.04"])
    results, info = bench.run(a, hf_dir)  # raises unless TRL's completions were all exactly 4 tokens too
    assert len(results[0.04]["trl"]) == len(results[0.04]["ours"]) == 1
    assert info["trl_params"] == info["ours_params"]  # the same model on both sides
    bench.report(a, results, info)
    assert "ours / TRL" in capsys.readouterr().out
