"""A sub-minute version of `bash train.sh`: every stage of the toy reproduction at tiny sizes, through the script."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_sh_runs_every_stage_and_skips_finished_ones(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "toy"), "DOCS": "3000", "BASE_STEPS": "20", "RL_STEPS": "3",
           "EVAL_PROBLEMS": "8", "THREADS": "1", "SEED": "3", "PROBE_MIN": "0.5", "BASE_MORE": "10", "BASE_CAP": "30"}
    out = tmp_path / "toy"
    # a 20-step base cannot write a stepwise solution: the pre-RL check trains it on to BASE_CAP=30 steps, checks
    # again and stops the run before RL, saying why
    r = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("probe FAILED") == 2 and "below --probe-min=0.5" in r.stdout and not (out / "rl").exists()
    assert "training it\n  on to 30 steps" in r.stdout and "step 30/30" in r.stdout
    assert "stopped before RL: trained to BASE_CAP=30 steps" in r.stdout and not (out / "eval_base").exists()
    probe = json.load(open(out / "probe_base" / "probe.json"))
    assert probe["passed"] is False and probe["split"] == "dev" and probe["step_ok_4"] < 0.5
    # with the check's bar at 0 the same base goes on to RL (the corpus and the base are reused, not rebuilt)
    env["PROBE_MIN"] = "0"
    r = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 20/20" not in r.stdout and json.load(open(out / "probe_base" / "probe.json"))["passed"] is True
    for f in ("data/corpus.txt", "data/tokenizer.bpe", "base/final/config.json", "eval_base/summary.json",
              "rl/final/config.json", "rl/metrics.jsonl", "eval_rl/instances.jsonl"):
        assert (out / f).exists(), f
    assert json.load(open(out / "data" / "contamination.json"))["contaminated"] == 0
    assert "| pass@1 (k=4, ± se) |" in r.stdout and "shared problems" in r.stdout and "total wall time" in r.stdout
    steps = [json.loads(l)["step"] for l in open(out / "rl" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]  # step 0: the held-out eval of the base
    # SEED reaches pretraining, RL and the eval's samples; the problems stay the protocol's
    for f in ("base/config.json", "rl/config.json"):
        assert json.load(open(out / f))["seed"] == 3, f
    for f in ("eval_base/summary.json", "eval_rl/summary.json"):
        cfg = json.load(open(out / f))["config"]
        assert cfg["seed"] == 3 and cfg["problem_seed"] == 1337, f
    assert [l.split()[0] for l in open(out / "times.tsv")] == ["data", "pretrain", "pretrain_more", "eval_base",
                                                               "grpo", "eval_rl"]
    assert max(json.loads(l)["step"] for l in open(out / "base" / "metrics.jsonl")) == 30
    # a second run finds every output and only re-prints the report
    again = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "step 1" not in again.stdout and "| pass@1" in again.stdout

