"""A sub-minute version of `bash train.sh`: every stage of the toy reproduction at tiny sizes, through the script."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_sh_runs_every_stage_and_skips_finished_ones(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "toy"), "DOCS": "3000", "BASE_STEPS": "20", "RL_STEPS": "3",
           "EVAL_PROBLEMS": "8", "THREADS": "1"}
    r = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "toy"
    for f in ("data/corpus.txt", "data/tokenizer.bpe", "base/final/config.json", "eval_base/summary.json",
              "rl/final/config.json", "rl/metrics.jsonl", "eval_rl/instances.jsonl"):
        assert (out / f).exists(), f
    assert json.load(open(out / "data" / "contamination.json"))["contaminated"] == 0
    assert "| pass@1 (k=4, ± se) |" in r.stdout and "shared problems" in r.stdout and "total wall time" in r.stdout
    steps = [json.loads(l)["step"] for l in open(out / "rl" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]  # step 0: the held-out eval of the base
    # a second run finds every output and only re-prints the report
    again = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "step 1" not in again.stdout and "| pass@1" in again.stdout
