"""The ablations the paper's reviewers asked for, at toy scale: one knob at a time from one base, several seeds each.

    python ablate.py --list [--steps=40]                       # the settings, one per line: name and grpo.py flags
    python ablate.py --table --out-dir=out/ablate [--seeds=4,5,6]  # the table (markdown) and curves of the runs

train.sh ablate runs grpo.py --preset=cpu with each setting's flags for each seed from the default run's base
(out/toy/base), then eval.py on the held-out problems, into out/ablate/<name>/<seed>/{rl,eval}. The table gives, per
setting: held-out pass@1 (mean over seeds, its standard error over problems averaged over seeds, and the spread:
the worst and best seed), pass@1 within a fixed token budget (a sample longer than --budget tokens counts as wrong:
this separates "longer" from "better"), mean completion length, and wall time per run. On the toy the routes differ
in length: a direct answer is 41 tokens (3 operands) or 44 (4), a stepwise solution 57 or 69, so the default
budget of 48 counts the direct answers only: a setting that is better only by writing stepwise more often gains
pass@1 but not pass@1 within 48. A setting differs from its reference (the default; an off-policy knob: the
off-policy baseline) beyond seed noise when all its seeds lie above (or below) all the reference's: with 3 seeds
each, a one-sided permutation test at p = 1/20 (one of the 20 ways to split 6 runs into two sets of 3 puts the 3
best on one side). A rough test, and over many settings some will pass it by chance: confirm on new seeds.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

import config

# name -> grpo.py flags on top of --preset=cpu (every other setting is the preset's). The preset: per-token ratio,
# seq_mean_token_mean, group std, eps 0.2, beta 0, G=8 x 16 prompts, one update per rollout (on-policy).
OFF_POLICY = ["--mu=2", "--num-minibatches=2"]
SETTINGS = {
    "default": [],
    "agg=token_mean": ["--loss-agg=token_mean"],
    "agg=dr_grpo": ["--loss-agg=dr_grpo"],
    "std=off": ["--adv-scale=none"],
    "eps_high=0.28": ["--eps-high=0.28"],
    "eps=10": ["--eps-low=10", "--eps-high=10"],
    "beta=0.001": ["--beta=0.001", "--ref-refresh-every=0"],
    "beta=0.04": ["--beta=0.04", "--ref-refresh-every=0"],
    "beta=0.001+refresh": ["--beta=0.001", "--ref-refresh-every=10"],
    "beta=0.04+refresh": ["--beta=0.04", "--ref-refresh-every=10"],
    "mu=2,minibatches=2": OFF_POLICY,  # 4 updates per rollout: at equal steps, a quarter of the samples
    "mu=2,minibatches=2,equal_samples": OFF_POLICY + ["--max-steps={steps_x4}"],  # as many rollouts as the default
    "gspo": ["--ratio-level=sequence", "--eps-low=3e-4", "--eps-high=4e-4"],
    "tis=2": ["--tis-cap=2"],
    "routing_replay": ["--routing-replay"],
    "G=4": ["--group-size=4", "--rollout-prompts=32"],    # equal samples per rollout: 128
    "G=16": ["--group-size=16", "--rollout-prompts=8"],
}
# The preset is exactly on-policy (one update per rollout): every ratio is 1, so no clip ever binds and GSPO's
# gradient is the per-token one. These knobs act only off-policy: here with 4 updates per rollout, and each is
# compared with that off-policy baseline ("mu=2,minibatches=2"), not with the default.
OFF_POLICY_KNOBS = {
    "mu=2,minibatches=2,eps=10": OFF_POLICY + ["--eps-low=10", "--eps-high=10"],
    "mu=2,minibatches=2,eps_high=0.28": OFF_POLICY + ["--eps-high=0.28"],
    "mu=2,minibatches=2,gspo": OFF_POLICY + ["--ratio-level=sequence", "--eps-low=3e-4", "--eps-high=4e-4"],
}
SETTINGS |= OFF_POLICY_KNOBS


def reference(name):
    """The setting a row is compared with: an off-policy knob with the off-policy baseline, the rest the default."""
    return "mu=2,minibatches=2" if name in OFF_POLICY_KNOBS else "default"


def flags(name, steps=40):
    """A setting's grpo.py flags in a sweep of `steps` GRPO steps (a setting may run a multiple of them)."""
    return [f.format(steps_x4=4 * steps) for f in SETTINGS[name]]


def dirname(name):
    """A setting's directory name under out_dir (what `--list` prints first)."""
    return name.replace("=", "-").replace(",", "_").replace("+", "_")


@dataclass
class AblateConfig:
    """nano-r1 ablate.py: the ablation settings and their table"""
    list: bool = False           # print the settings (name, then the flags), one per line
    steps: int = 40              # the sweep's GRPO steps (train.sh's ABL_STEPS): for settings that run a multiple
    table: bool = False          # the table and curves of the runs in out_dir
    out_dir: str = "out/ablate"
    png: str = ""                # default: <out_dir>/curves.png
    seeds: str = ""              # only these seeds' runs, comma-separated (default: every finished one)
    budget: int = 48             # tokens: pass@1 counting longer samples as wrong (48: direct answers only)


def load_run(d, budget):
    """One seed's run: its eval summary and instances -> pass@1, its se, pass@1 within budget, mean length; the
    training curve (step, accuracy, held-out pass@1); wall time from the run's metrics."""
    with open(os.path.join(d, "eval", "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(d, "eval", "instances.jsonl")) as f:
        samples = [smp for line in f for smp in json.loads(line)["samples"]]
    within = np.mean([(smp["accuracy"] or 0) >= 1 and smp["tokens"] <= budget for smp in samples])
    with open(os.path.join(d, "rl", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    curve = [(r["step"], r.get("accuracy")) for r in rows if r["step"] > 0]
    with open(os.path.join(d, "rl", "config.json")) as f:
        cfg = json.load(f)  # the run's own settings
    steps = [r for r in rows if "clip_low" in r] or [{}]  # the diagnostics: means over steps, the gap's max
    by_ops = s.get("by_difficulty", {})
    return {"pass1": s["pass@1"], "se": s["pass@1_se"], "within": float(within), "length": s["mean_length"],
            "wall": max((r.get("elapsed_s", 0) for r in rows), default=0), "curve": curve,
            "seed": os.path.basename(os.path.normpath(d)), "per_rollout": cfg["mu"] * cfg["num_minibatches"],
            "clip": np.mean([r.get("clip_low", 0) + r.get("clip_high", 0) for r in steps]),
            "kl": np.mean([r.get("kl", 0) for r in steps]),
            "gap": max(r.get("sampler_trainer_gap_max", 0) for r in steps),
            "ops": {k: v["pass@1"] for k, v in by_ops.items()}}


def table(out_dir, budget, png, only=""):
    runs = {}
    for name in SETTINGS:
        d = os.path.join(out_dir, dirname(name))
        seeds = sorted(x for x in os.listdir(d) if os.path.isfile(os.path.join(d, x, "eval", "summary.json"))
                       and (not only or x in only.split(","))) if os.path.isdir(d) else []
        if seeds:
            runs[name] = [load_run(os.path.join(d, s), budget) for s in seeds]
    if "default" not in runs:
        raise config.UserError(f"--out-dir: no finished default runs in {out_dir} (bash train.sh ablate)")
    lines = [f"| setting | seeds | held-out pass@1 (mean ± se) | worst / best seed | pass@1 within {budget} tokens "
             "| length | wall per run (s) | vs reference |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        p, ref = [r["pass1"] for r in rs], reference(name)
        verdict = "-"
        if name != "default" and ref in runs:
            lo, hi = min(r["pass1"] for r in runs[ref]), max(r["pass1"] for r in runs[ref])
            verdict = "higher" if min(p) > hi else "lower" if max(p) < lo else "within noise"
            verdict += "" if ref == "default" else f" (vs {ref})"
        lines.append(f"| {name} | {len(rs)} | {np.mean(p):.3f} ± {np.mean([r['se'] for r in rs]):.3f} | "
                     f"{min(p):.3f} / {max(p):.3f} | {np.mean([r['within'] for r in rs]):.3f} | "
                     f"{np.mean([r['length'] for r in rs]):.1f} | {np.mean([r['wall'] for r in rs]):.0f} | {verdict} |")
    lines += ["", "| setting | pass@1 per seed | 3 / 4 operands | clip | KL | gap max |", "|---|---|---|---|---|---|"]
    for name, rs in runs.items():  # clip: share of tokens clipped; KL (k3); gap: max |log pi_sampler - log pi|
        ops = " / ".join(f"{np.mean([r['ops'][k] for r in rs if k in r['ops']]):.3f}"
                         for k in sorted({k for r in rs for k in r["ops"]}))
        per_seed = ", ".join(f"{r['seed']}: {r['pass1']:.3f}" for r in rs)
        lines.append(f"| {name} | {per_seed} | {ops} | "
                     f"{np.mean([r['clip'] for r in rs]):.4f} | {np.mean([r['kl'] for r in rs]):.5f} | "
                     f"{max(r['gap'] for r in rs):.1e} |")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no curves)")
        return "\n".join(lines)
    # two panels: the knobs against the default, and the off-policy ones against their baseline; mean over seeds
    # (the worst seed is in the table), five steps' moving average so that the lines can be told apart; against
    # rollouts, i.e. samples seen (4 updates per rollout off-policy)
    off = {name for name, rs in runs.items() if rs[0]["per_rollout"] > 1}
    refs = {reference(name) for name in runs}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, names, title in ((axes[0], [n for n in runs if n not in off], "on-policy (one update per rollout)"),
                             (axes[1], ["default"] + [n for n in runs if n in off], "4 updates per rollout")):
        colors = plt.cm.tab20(np.linspace(0, 1, 20))
        for i, name in enumerate(names):
            rs = runs[name]
            steps = sorted({s for r in rs for s, a in r["curve"] if a is not None})
            mean = [np.mean([a for r in rs for s, a in r["curve"] if s == t and a is not None]) for t in steps]
            smooth = np.convolve(mean, np.ones(5) / 5, mode="valid") if len(mean) >= 5 else mean
            rollouts = np.array(steps[len(steps) - len(smooth):]) / rs[0]["per_rollout"]
            ref = name in refs
            ax.plot(rollouts, smooth, label=name, lw=2.5 if ref else 1.2,
                    color="black" if name == "default" else colors[i % 20], ls="-" if ref or i % 2 else "--")
        ax.set_title(title)
        ax.set_xlabel("rollouts (128 samples each)")
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("training accuracy (mean over seeds, 5-step average)")
    fig.tight_layout()
    fig.savefig(png or os.path.join(out_dir, "curves.png"), dpi=100)
    print(f"curves: {png or os.path.join(out_dir, 'curves.png')}")
    return "\n".join(lines)


def main(argv=None):
    c = config.parse_config(AblateConfig, argv)
    config.need(c.list or c.table, "table", "give --list or --table")
    if c.list:
        for name in SETTINGS:
            print(dirname(name), *flags(name, c.steps))
    if c.table:
        return table(c.out_dir, c.budget, c.png, c.seeds)


if __name__ == "__main__":
    config.cli(main, "ablate.py")
