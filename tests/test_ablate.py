"""ablate.py: the table of the ablation runs (synthetic run directories), and `bash train.sh ablate` at tiny size."""
import json
import os
import subprocess

import pytest

import ablate
import checkpoint
from config import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(d, pass1, lengths, correct, elapsed=100.0, per_rollout=1):
    """An eval of len(correct) samples (their lengths and correctness), a 3-step training log and its settings."""
    os.makedirs(os.path.join(d, "eval"))
    os.makedirs(os.path.join(d, "rl"))
    checkpoint.atomic_write_json(os.path.join(d, "rl", "config.json"), {"mu": 1, "num_minibatches": per_rollout})
    checkpoint.atomic_write_json(os.path.join(d, "eval", "summary.json"),
                                 {"pass@1": pass1, "pass@1_se": 0.02, "mean_length": sum(lengths) / len(lengths)})
    checkpoint.atomic_write_jsonl(os.path.join(d, "eval", "instances.jsonl"), [
        {"samples": [{"accuracy": float(c), "tokens": n} for n, c in zip(lengths, correct)]}])
    checkpoint.atomic_write_jsonl(os.path.join(d, "rl", "metrics.jsonl"), [
        {"step": s, "accuracy": pass1 * s / 3, "elapsed_s": elapsed * s / 3} for s in (1, 2, 3)])


def test_table_mean_spread_budget_and_verdict(tmp_path, capsys):
    out = str(tmp_path)
    for s, p in ((1, 0.80), (2, 0.85), (3, 0.90)):
        fake_run(os.path.join(out, "default", str(s)), p, [50, 70], [1, 1])
    for s, p in ((1, 0.95), (2, 0.97)):  # every seed above the default's best: beyond seed noise
        fake_run(os.path.join(out, "gspo", str(s)), p, [50, 70], [1, 0])
    fake_run(os.path.join(out, "std-off", "1"), 0.84, [90, 90], [1, 1], elapsed=300)  # inside the default's range
    for s, p in ((1, 0.5), (2, 0.6)):  # an off-policy knob is compared with the off-policy baseline, not the default
        fake_run(os.path.join(out, "mu-2_minibatches-2", str(s)), p, [50], [1], per_rollout=4)
        fake_run(os.path.join(out, "mu-2_minibatches-2_gspo", str(s)), p + 0.2, [50], [1], per_rollout=4)
    ablate.main(["--table", f"--out-dir={out}", "--budget=64"])
    main, per_seed = capsys.readouterr().out.split("\n\n")[:2]  # the table, then each seed's pass@1
    lines = {line.split(" | ")[0][2:]: line for line in main.splitlines() if line.startswith("| ")}
    assert "| 3 | 0.850 ± 0.020 | 0.800 / 0.900 | 0.500 | 60.0 | 100 | - |" in lines["default"]
    assert lines["gspo"].endswith("| 2 | 0.960 ± 0.020 | 0.950 / 0.970 | 0.500 | 60.0 | 100 | higher |")
    assert lines["std=off"].endswith("| 0.000 | 90.0 | 300 | within noise |")  # all past the 64-token budget
    assert lines["mu=2,minibatches=2"].endswith("| lower |")
    assert lines["mu=2,minibatches=2,gspo"].endswith("| higher (vs mu=2,minibatches=2) |")
    assert "| default | 1: 0.800, 2: 0.850, 3: 0.900 |" in per_seed and "| gspo | 1: 0.950, 2: 0.970 |" in per_seed
    assert (tmp_path / "curves.png").stat().st_size > 1000
    ablate.main(["--table", f"--out-dir={out}", "--seeds=2,3"])  # new seeds confirm (or not) what 1-3 showed
    main = capsys.readouterr().out.split("\n\n")[0]
    lines = {line.split(" | ")[0][2:]: line for line in main.splitlines() if line.startswith("| ")}
    assert "| 2 | 0.875 ± 0.020 | 0.850 / 0.900 |" in lines["default"] and "std=off" not in lines
    with pytest.raises(UserError, match="no finished default runs"):
        ablate.main(["--table", f"--out-dir={tmp_path / 'none'}"])


def test_every_setting_is_a_valid_grpo_config():
    import config
    import grpo
    for name in ablate.SETTINGS:
        c = config.parse_config(grpo.GRPOConfig, ["--preset=cpu", "--init-from=x", "--max-steps=12",
                                                  *ablate.flags(name, steps=12)], grpo.PRESETS)
        grpo.check_config(c)
        assert c.rollout_prompts * c.group_size == 128, name  # equal samples per rollout in every setting
        rollouts = c.max_steps // (c.mu * c.num_minibatches)
        assert rollouts == (12 if name in ("default", "mu=2,minibatches=2,equal_samples") else
                            12 // (c.mu * c.num_minibatches)), name  # equal steps, or equal samples where named


def test_train_sh_ablate_runs_the_chosen_settings(tmp_path):
    """Two settings, one seed, 2 GRPO steps each from a tiny base: runs, evals and the table."""
    import hf
    import toy
    from model import ModelConfig, Transformer
    base = tmp_path / "base" / "final"
    tok = toy.toy_tokenizer(n_docs=500)
    cfg = ModelConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
                      moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, eos_token_id=tok.eot_id)
    hf.save(Transformer(cfg), str(base))
    tok.save(str(base / "tokenizer.bpe"))
    env = {**os.environ, "BASE": str(tmp_path / "base"), "OUT": str(tmp_path / "ablate"), "SEEDS": "1",
           "ABL_STEPS": "2", "ABL_PROBLEMS": "4", "THREADS": "1", "ONLY": "default gspo"}
    r = subprocess.run(["bash", "train.sh", "ablate"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ablate")) == ["curves.png", "default", "gspo", "table.md"]
    assert json.load(open(tmp_path / "ablate" / "gspo" / "1" / "rl" / "config.json"))["ratio_level"] == "sequence"
    table = open(tmp_path / "ablate" / "table.md").read()
    assert "| default | 1 |" in table and "| gspo | 1 |" in table and "ablation wall time" in r.stdout
    r = subprocess.run(["bash", "train.sh", "ablate"], cwd=ROOT, env={**env, "BASE": str(tmp_path / "nope")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no base model" in r.stderr
