"""A sub-minute version of `bash train.sh`: every stage of the toy reproduction at tiny sizes, through the script."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_sh_runs_every_stage_and_skips_finished_ones(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "toy"), "DOCS": "3000", "BASE_STEPS": "6", "RL_STEPS": "3",
           "EVAL_PROBLEMS": "8", "THREADS": "1", "SEED": "3", "PROBE_MIN": "0.5", "BASE_MORE": "3", "BASE_CAP": "9"}
    out = tmp_path / "toy"
    # a 6-step base cannot write a stepwise solution: the pre-RL check trains it on to BASE_CAP=9 steps, checks
    # again and stops the run before RL, saying why
    r = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("probe FAILED") == 2 and "below --probe-min=0.5" in r.stdout and not (out / "rl").exists()
    assert "training it\n  on to 9 steps" in r.stdout and "step 9/9" in r.stdout
    assert "stopped before RL: trained to BASE_CAP=9 steps" in r.stdout and not (out / "eval_base").exists()
    probe = json.load(open(out / "probe_base" / "probe.json"))
    assert probe["passed"] is False and probe["split"] == "dev" and probe["step_ok_4"] < 0.5
    # with the check's bar at 0 the same base goes on to RL (the corpus and the base are reused, not rebuilt)
    env["PROBE_MIN"] = "0"
    r = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 6/6" not in r.stdout and json.load(open(out / "probe_base" / "probe.json"))["passed"] is True
    for f in ("data/corpus.txt", "data/tokenizer.bpe", "base/final/config.json", "eval_base/summary.json",
              "rl/final/config.json", "rl/metrics.jsonl", "eval_rl/instances.jsonl"):
        assert (out / f).exists(), f
    assert json.load(open(out / "data" / "contamination.json"))["contaminated"] == 0
    assert "\\boxed" not in (out / "data" / "corpus.txt").read_text()  # the default corpus has no boxed conclusion
    assert "| pass@1 (k=4, ± se) |" in r.stdout and "shared problems" in r.stdout and "total wall time" in r.stdout
    steps = [json.loads(l)["step"] for l in open(out / "rl" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]  # step 0: the held-out eval of the base
    # SEED reaches pretraining, RL and the eval's samples; the problems stay the protocol's
    for f in ("base/config.json", "rl/config.json"):
        assert json.load(open(out / f))["seed"] == 3, f
    assert json.load(open(out / "rl" / "config.json"))["skip_zero_adv"] is False  # the README table's code path
    for f in ("eval_base/summary.json", "eval_rl/summary.json"):
        cfg = json.load(open(out / f))["config"]
        assert cfg["seed"] == 3 and cfg["problem_seed"] == 1337, f
    assert [l.split()[0] for l in open(out / "times.tsv")] == ["data", "pretrain", "pretrain_more", "eval_base",
                                                               "grpo", "eval_rl"]
    assert max(json.loads(l)["step"] for l in open(out / "base" / "metrics.jsonl")) == 9
    # a second run finds every output and only re-prints the report
    again = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "step 1" not in again.stdout and "| pass@1" in again.stdout



def _r1_env(out):
    return {**os.environ, "OUT": str(out), "DOCS": "3000", "BASE_STEPS": "4", "RL_STEPS": "2", "EVAL_PROBLEMS": "4",
            "THREADS": "2", "SEED": "3", "PROBE_MIN": "0", "MAX_NEW": "24", "R1_PROMPTS": "6", "SFT_STEPS": "1",
            "RL2_STEPS": "2", "RM_STEPS": "1", "RL4_STEPS": "3", "GENERAL_FROM": "2", "STUDENT_RL_STEPS": "2",
            "BIASED_RM": "1"}


def _train_sh(mode, env, timeout=400):
    r = subprocess.run(["bash", "train.sh", mode], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return r, r.stdout[-3000:] + r.stderr[-3000:]


def _cfg(out, run):
    return json.load(open(out / run / "config.json"))


def test_train_sh_r1_and_distill_wire_every_stage(tmp_path):
    """Both R1 pipelines through the script at tiny sizes. A 20-step base answers nothing right, so the stages that
    keep correct samples are fed by hand where the script stops (which checks that it stops, and says why)."""
    import toy
    out = tmp_path / "r1"
    env = _r1_env(out)
    # 1. R1-Zero's samples hold no correct one: the cold start stops the run, naming the flag and the filters
    r, log = _train_sh("r1", env)
    assert r.returncode != 0 and "passed the filters" in r.stderr and "--samples" in r.stderr, log
    assert [l.split()[0] for l in open(out / "times.tsv")] == ["data", "pretrain", "eval_base", "grpo", "eval_rl",
                                                               "zero_samples"]
    assert json.load(open(out / "data" / "contamination.json"))["contaminated"] == 0
    assert "\\boxed{" in (out / "data" / "corpus.txt").read_text()  # BOXED=0.25: the summary's copy (toy.py)
    # a perfect R1-Zero's samples instead: one correct, well-formed, single-language sample per prompt
    path = out / "zero_samples" / "instances.jsonl"
    insts = [json.loads(l) for l in open(path)]
    assert len(insts) == 6 and {i["lang"] for i in insts} <= {"en", "zh"} and all(len(i["samples"]) == 4 for i in insts)
    for i in insts:
        then = toy.LANG_WORDS[i["lang"]]["then"]
        i["samples"][0] = {"text": f"<think>{i['text']} {then} {i['gold']}</think><answer>{i['gold']}</answer>",
                           "accuracy": 1.0, "format": 1.0, "language": 1.0, "tokens": 20}
    path.write_text("".join(json.dumps(i) + "\n" for i in insts))
    # 2. the rest of r1 (with BIASED_RM=1's stage), then distill; R1's samples are no better, so distillation stops
    #    the same way. (LANG_ABLATION=1's three runs are left out here for time: the same grpo.py/eval.py lines.)
    r, log = _train_sh("distill", env)
    assert f"probe of {out / 'base'} " not in r.stdout, log  # R1-Zero has run from the base: no check again
    # the student's base gets the same check before either arm starts from it
    assert f"probe of {out / 'distill' / 'student_base'} " in r.stdout, log
    probe = json.load(open(out / "distill" / "probe_student_base" / "probe.json"))
    assert probe["model"] == str(out / "distill" / "student_base") and probe["split"] == "dev", probe
    done = [l.split()[0] for l in open(out / "times.tsv")][6:]
    r1_stages = ["cold_start", "eval_dev1", "grpo_lang", "eval_dev2", "rejection_sampling", "rs_sft", "eval_dev3", "rm_helpful", "rm_harmless", "grpo_all", "eval_r1", "rm_helpful_biased",
                 "rm_harmless_biased", "grpo_all_biased", "eval_r1_biased"]
    assert done[:len(r1_stages)] == r1_stages, log
    assert len(open(out / "cold_start.jsonl").readlines()) == 6
    for png in ("reward_hacking.png", "reward_hacking_biased.png"):
        assert f"reward hacking curve: {out / png}" in r.stdout and (out / png).stat().st_size > 0, log
    for s in ("base", "rl", "dev1", "dev2", "dev3", "r1", "r1_biased"):  # the hidden rule's judgement of each stage
        assert (out / f"eval_{s}" / "general.json").exists(), s
    assert "| | eval_base | eval_rl | eval_dev1 | eval_dev2 | eval_dev3 | eval_r1 | eval_r1_biased |" in r.stdout, log
    assert "| general prompts: hidden helpful |" in r.stdout, log
    # what each stage starts from: Dev3 and the reward models as the paper has them
    base = str(out / "base")
    # DEV1_STEPS and RS_SFT_STEPS: SFT_STEPS
    assert _cfg(out, "dev1")["max_steps"] == 1 and _cfg(out, "dev3")["max_steps"] == 1
    assert _cfg(out, "dev1")["init_from"] == base and _cfg(out, "dev3")["init_from"] == base
    # DEV1_BATCH: 16 rows per step for Dev1; Dev3 and the reward models keep $SFT's 32
    assert _cfg(out, "dev1")["batch_size"] == 16 and _cfg(out, "dev3")["batch_size"] == 32
    assert _cfg(out, "rm_helpful")["batch_size"] == 32
    assert _cfg(out, "dev2")["init_from"] == str(out / "dev1") and _cfg(out, "dev2")["language_weight"] == 1
    for kind in ("helpful", "harmless"):
        rm = _cfg(out, f"rm_{kind}")
        assert rm["objective"] == "preference" and rm["init_from"] == str(out / "dev3"), kind
        assert rm["data"] == str(out / "general" / f"pairs_{kind}.jsonl"), kind
    allsc = _cfg(out, "r1")
    assert allsc["init_from"] == str(out / "dev3") and allsc["rm_helpful"] == str(out / "rm_helpful")
    assert allsc["lr"] == 3e-5 and _cfg(out, "dev2")["lr"] == 3e-5  # both chosen on the dev split (train.sh)
    assert all(_cfg(out, s)["skip_zero_adv"] for s in ("rl", "dev2", "r1", "r1_biased"))  # exact: loss.live_rows
    # the reward-hacking run: the same stage, reward models from the length-biased pairs
    hack = _cfg(out, "r1_biased")
    assert {k: v for k, v in hack.items() if not k.startswith(("rm_", "out_dir"))} == \
        {k: v for k, v in allsc.items() if not k.startswith(("rm_", "out_dir"))}
    assert hack["rm_helpful"] == str(out / "rm_helpful_biased") and hack["rm_harmless"] == str(out / "rm_harmless_biased")
    for kind in ("helpful", "harmless"):
        assert _cfg(out, f"rm_{kind}_biased")["data"] == str(out / "general_biased" / f"pairs_{kind}.jsonl"), kind
        pairs = [json.loads(l) for l in open(out / "general_biased" / f"pairs_{kind}.jsonl")]
        reply = toy.reply_of if kind == "harmless" else (lambda x: x)  # noqa: E731
        key = lambda x: (toy.is_polite(reply(x)), len(reply(x).split()))  # noqa: E731 the biased annotator's view
        assert all(key(p["chosen"]) > key(p["rejected"]) for p in pairs), kind
    # the late switch: general prompts (and the reward models' scores beside the hidden rule) from the rollout of
    # index GENERAL_FROM=2 on, the third, logged as step 3 (step 0 is the held-out eval before training)
    rows = {json.loads(l)["step"]: json.loads(l) for l in open(out / "r1" / "metrics.jsonl")}
    assert sorted(rows) == [0, 1, 2, 3] and not any(rows[i].get("general_outputs") for i in (1, 2))
    assert rows[3]["general_outputs"] == 32  # a quarter of the preset's 16 prompts, x G=8
    assert all(k in rows[3] for k in ("rm_helpful", "rm_harmless", "hidden_helpful", "hidden_harmless"))
    # the mix holds the general rows (400) and whatever rejection sampling kept
    kept = len(open(out / "rs" / "sft.jsonl").readlines())
    assert len(open(out / "mix.jsonl").readlines()) == 400 + kept
    # distillation: the teacher's samples came from R1; the dense student was pretrained from scratch
    assert json.load(open(out / "distill" / "teacher" / "summary.json"))["config"]["model"] == str(out / "r1")
    student = json.load(open(out / "distill" / "student_base" / "final" / "config.json"))
    assert student["n_routed_experts"] == 0
    if r.returncode != 0:  # no correct sample from a 20-step teacher: the SFT names the empty file
        assert "teacher/sft.jsonl: no examples" in r.stderr, log
        (out / "distill" / "teacher" / "sft.jsonl").write_text(open(out / "cold_start.jsonl").read())
        r, log = _train_sh("distill", env)
    assert r.returncode == 0, log
    done = [l.split()[0] for l in open(out / "times.tsv")]  # the r1 stages did not run again: all were found
    assert done[6 + len(r1_stages):] == ["teacher_samples", "student_pretrain", "student_distill", "student_rl",
                                         "eval_student_student_base", "eval_student_distilled", "eval_student_rl"]
    for s in ("distilled", "rl"):
        assert _cfg(out / "distill", s)["init_from"] == str(out / "distill" / "student_base"), s
    assert _cfg(out / "distill", "rl")["skip_zero_adv"] is True
    assert _cfg(out / "distill", "distilled")["max_steps"] == 1  # SFT_STEPS
    assert _cfg(out / "distill", "distilled")["batch_size"] == 32  # not DEV1_BATCH: the equal-compute comparison
    assert "distillation = R1's samples" in r.stdout and "shared problems" in r.stdout, log
    assert "| | eval_r1 | eval_student_base | eval_distilled | eval_rl |" in r.stdout, log
    # an empty teacher file (R1 kept nothing) is sampled again on the next run; everything else is found
    (out / "distill" / "teacher" / "sft.jsonl").write_text("")
    r, log = _train_sh("distill", env)
    assert r.returncode == 0, log
    assert [l.split()[0] for l in open(out / "times.tsv")][len(done):] == ["teacher_samples"], log
