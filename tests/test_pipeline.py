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


def test_train_sh_r1_runs_every_stage_of_the_r1_pipeline(tmp_path):
    """`bash train.sh r1` at tiny sizes: every stage runs, in order, and the stage table, the general prompts' hidden
    rule and the reward-hacking curve come out. A 20-step base solves nothing, so the cold-start data is given
    (train.sh skips a stage whose output exists); everything else is made by the script."""
    import checkpoint
    import eval as ev
    import r1
    import tasks
    out = tmp_path / "r1"
    out.mkdir()
    rows = []
    for e in tasks.load_task("toy:en,zh", n=8, seed=1337, split="train"):
        comp = ev.toy_solution_roles(e.meta["text"], lang=e.meta["lang"])[0]
        rows.append({"prompt": f"User: {e.prompt}\nAssistant:", "completion": r1.rewrite(comp, e.meta["text"],
                                                                                          e.meta["lang"])})
    checkpoint.atomic_write_jsonl(str(out / "cold_start.jsonl"), rows)
    env = {**os.environ, "OUT": str(out), "DOCS": "3000", "BASE_STEPS": "20", "RL_STEPS": "2", "EVAL_PROBLEMS": "4",
           "THREADS": "1", "PROBE_MIN": "0", "R1_PROMPTS": "4", "SFT_STEPS": "3", "RL2_STEPS": "2", "RM_STEPS": "3",
           "RL4_STEPS": "4", "GENERAL_FROM": "2"}
    r = subprocess.run(["bash", "train.sh", "r1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [l.split()[0] for l in open(out / "times.tsv")] == [
        "data", "pretrain", "eval_base", "grpo", "eval_rl", "zero_samples", "cold_start", "eval_dev1", "grpo_lang",
        "eval_dev2", "rejection_sampling", "rs_sft", "eval_dev3", "rm_helpful", "rm_harmless", "grpo_all", "eval_r1"]
    assert "计算 " in open(out / "data" / "corpus.txt", encoding="utf-8").read(100000)  # the bilingual corpus
    table = r.stdout[r.stdout.index("| | eval_base"):]
    for row in ("| language consistency |", "| general prompts: hidden helpful |", "| general prompts: hidden harmless |"):
        assert row in table and table.split(row)[1].split("\n")[0].count("|") == 7, row  # 6 stages
    assert json.load(open(out / "dev2" / "config.json"))["language_weight"] == 1.0
    assert json.load(open(out / "dev3" / "config.json"))["init_from"] == str(out / "base")  # the base, as the paper
    rm = [json.loads(l) for l in open(out / "rm_helpful" / "metrics.jsonl")]
    assert "accuracy" in rm[-1] and json.load(open(out / "rm_harmless" / "config.json"))["objective"] == "preference"
    steps = [json.loads(l) for l in open(out / "r1" / "metrics.jsonl") if json.loads(l)["step"] > 0]
    assert [s.get("general_outputs", 0) > 0 for s in steps] == [False, False, True, True]  # after step 2 (the switch)
    assert all("rm_helpful" in s and "hidden_helpful" in s for s in steps[2:])
    assert (out / "reward_hacking.png").stat().st_size > 1000 and "total wall time" in r.stdout
