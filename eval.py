"""Evaluation: pass@1 over k samples, cons@k, pass@k, per-instance outputs, paired comparison, rejection sampling.

    python eval.py --model=out/rl --task=toy --split=heldout --problems=200 --k=4 --out-dir=out/eval_rl
    python eval.py --compare=out/eval_base,out/eval_rl          # paired bootstrap over the shared problems
    python eval.py --model=out/rl --task=toy --split=train --problems=2000 --k=8 --rejection-sampling --out-dir=out/rs
    torchrun --standalone --nproc_per_node=8 eval.py --model=/path/to/hf --task=aime.jsonl --k=64 ...

Protocol (the R1 paper's): k samples per problem at temperature 0.6, top-p 0.95 (greedy decoding is avoided);
pass@1 = the share of all samples that are correct (fully: a code sample passes every test); its standard error
treats problems as the unit (the std of the per-problem means / sqrt(problems)). cons@k: majority vote over the
normalised extracted answers of the k samples; TIE RULE: a tie for the most frequent answer is no majority, and the
problem counts as wrong (this keeps cons@k independent of sample order). pass@k: the unbiased estimator
1 - C(n-c, k)/C(n, k) per problem, averaged.
Outputs in out_dir: instances.jsonl (one problem per line: prompt, gold, every sample with its extracted answer
and rewards) and summary.json; with --rejection-sampling, sft.jsonl of correct, well-formed samples.
"""
import dataclasses
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

import checkpoint
import config
import data
import dist
import rewards
import rollout
import tasks
import toy
from config import ConfigError
from dist import print0

# The reflective words the R1 paper counts, reported as it does: occurrences per token.
REFLECTIVE_WORDS = ("wait", "mistake", "however", "but", "retry", "error", "verify", "wrong", "evaluate", "check")
_REFLECT = re.compile(r"\b(" + "|".join(REFLECTIVE_WORDS) + r")\b", re.I)


def reflective_count(text):
    return len(_REFLECT.findall(text))


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k)/C(n, k), as a running product (no huge
    binomials): C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def vote(answers, same=rewards.same_answer):
    """Majority vote -> the indices of the samples in the winning group ([] when nothing wins). Answers that `same`
    calls equal vote together (rewards.same_answer: "1,000" and "1000.0", and "1/2", "0.5" and "\\frac12"); each
    answer is compared with one representative per group. No answer (None) is a vote too, for nothing: if it wins,
    no answer wins. TIE RULE: a tie for the most votes is no majority (so cons@k does not depend on sample order)."""
    groups = []  # [representative answer, [sample indices]]
    for i, a in enumerate(answers):
        for g in groups:
            if (a is None) == (g[0] is None) and (a is None or same(g[0], a)):
                g[1].append(i)
                break
        else:
            groups.append([a, [i]])
    groups.sort(key=lambda g: -len(g[1]))  # stable
    if not groups or (len(groups) > 1 and len(groups[0][1]) == len(groups[1][1])) or groups[0][0] is None:
        return []
    return groups[0][1]


def majority_vote(answers, same=rewards.same_answer):
    """The winning answer of vote(), or None (no majority, or no answer won)."""
    won = vote(answers, same)
    return answers[won[0]] if won else None


@torch.no_grad()
def evaluate(model, tok, examples, k=16, template="", temperature=0.6, top_p=0.95, max_new_tokens=32768, seed=0,
             workers=2, stop_strings=("</answer>",), batch_prompts=64, lang="en", rg_exact=True,
             code_isolation="strict"):
    """Sample k completions per example and score them. Returns the summary dict; summary["instances"] holds the
    per-problem records. Prompts are split over ranks under torchrun; the summary covers all of them."""
    if not examples:
        raise ValueError("evaluate: no examples")
    was_training = model.training
    model.eval()
    mine = list(range(dist.rank(), len(examples), dist.world_size()))
    with dist.gathered(model):  # under FSDP: weights all-gathered once, not at every decode step
        instances = _sample_and_score(model, tok, examples, mine, k, template, temperature, top_p, max_new_tokens,
                                      seed, workers, stop_strings, batch_prompts, lang, rg_exact, code_isolation)
    instances = sorted(dist.all_gather(instances), key=lambda x: x["index"])
    model.train(was_training)
    return summarize(instances, k)


def row_seed(seed, problem, sample):
    """The random stream of one sample: a function of (seed, problem index, sample index) only, so an eval's samples
    are the same whatever --batch-prompts and however many ranks share the problems."""
    return int(np.random.SeedSequence([seed, problem, sample]).generate_state(1, np.uint64)[0] >> 1)


def _sample_and_score(model, tok, examples, mine, k, template, temperature, top_p, max_new_tokens, seed, workers,
                      stop_strings, batch_prompts, lang, rg_exact, code_isolation):
    stop_ids = rollout.stop_ids_for(model, tok)
    instances = []
    for s in range(0, len(mine), batch_prompts):
        idx = mine[s:s + batch_prompts]
        texts = [data.apply_template(template, examples[i].prompt) for i in idx]
        out = rollout.generate(model, [data.prompt_ids(tok, examples[i].prompt, template) for i in idx],
                               max_new_tokens, temperature, top_p,
                               num_samples=k, stop_ids=stop_ids, stop_strings=list(stop_strings),
                               decode=tok.decode, vocab_size=tok.vocab_size,
                               row_seeds=[row_seed(seed, i, g) for i in idx for g in range(k)])
        comps = rollout.completion_texts(tok, out, stop_ids)
        exs = [examples[i] for i in idx for _ in range(k)]
        block = bool(template)  # both templates ask for <answer></answer> (the toy's through its corpus): only that
        #                         block is an answer; with no template a \boxed{} anywhere counts
        total, parts, _ = rewards.score_batch(comps, exs, workers=workers, lang=lang, rg_exact=rg_exact,
                                              code_isolation=code_isolation,
                                              answer_block=block)
        for j, i in enumerate(idx):
            ex = examples[i]
            samples = [dict(text=comps[j * k + g], answer=rewards.extract_answer(comps[j * k + g], block),
                            accuracy=parts["accuracy"][j * k + g], format=parts["format"][j * k + g],
                            reward=total[j * k + g], tokens=len(out.tokens[j * k + g]),
                            truncated=out.truncated[j * k + g]) for g in range(k)]
            if "lang" in ex.meta:  # a problem that names its language (toy:en,zh): how much of the reasoning is in it
                for smp in samples:
                    smp["language"] = rewards.language_consistency_reward(smp["text"], ex.meta["lang"])
            instances.append(dict(index=i, id=ex.meta.get("id"), prompt=texts[j], gold=ex.answer, kind=ex.kind,
                                  difficulty=ex.meta.get("difficulty"), samples=samples,
                                  exact=ex.meta.get("notation") == "reversed",
                                  **{key: ex.meta[key] for key in ("lang", "text") if key in ex.meta}))
    return instances


def summarize(instances, k):
    per = []  # per-problem correctness fraction
    cons, fmt, lens, refl, ntok, trunc, skipped, lang = [], [], [], 0, 0, [], 0, []
    by_diff = defaultdict(list)
    for inst in instances:
        acc = [s["accuracy"] for s in inst["samples"]]
        if any(a is None for a in acc):  # an unparseable gold: skipped, and counted
            skipped += 1
            continue
        c = sum(a >= 1.0 for a in acc)  # a sample is correct when fully right (all code tests, not a fraction)
        p = c / len(acc)
        per.append(p)
        inst["pass@1"] = p
        # vote with the scorer's notion of "the same answer": exact text for the toy's reversed digits
        answers = [s["answer"] for s in inst["samples"]]
        if inst.get("exact"):
            answers = [a.strip() or None if a else None for a in answers]
        won = vote(answers, (lambda a, b: a == b) if inst.get("exact") else rewards.same_answer)
        inst["cons"] = float(any(inst["samples"][j]["accuracy"] >= 1.0 for j in won))
        cons.append(inst["cons"])
        inst["pass@k"] = {str(j): pass_at_k(len(acc), c, j) for j in ks(len(acc))}
        fmt += [s["format"] for s in inst["samples"]]
        lang += [s["language"] for s in inst["samples"] if "language" in s]
        lens += [s["tokens"] for s in inst["samples"]]
        trunc += [s["truncated"] for s in inst["samples"]]
        refl += sum(reflective_count(s["text"]) for s in inst["samples"])
        ntok += sum(s["tokens"] for s in inst["samples"])
        if inst.get("difficulty") is not None:
            by_diff[inst["difficulty"]].append(p)
    n = len(per)
    if n == 0:
        raise config.UserError("evaluate: every problem was skipped (unparseable golds)")
    mean = sum(per) / n
    se = (np.std(per, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    cons_se = (np.std(cons, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    summary = {"problems": n, "k": k, "skipped": skipped, "pass@1": mean, "pass@1_se": float(se),
               f"cons@{k}": sum(cons) / n, f"cons@{k}_se": float(cons_se), "format_rate": sum(fmt) / len(fmt),
               "mean_length": sum(lens) / len(lens),
               "truncated": sum(trunc) / len(trunc), "reflective_per_token": refl / max(1, ntok),
               "pass@k": {j: sum(i["pass@k"][j] for i in instances if "pass@k" in i) / n for j in map(str, ks(k))},
               "by_difficulty": {str(d): {"problems": len(v), "pass@1": sum(v) / len(v)}
                                 for d, v in sorted(by_diff.items())}}
    summary.update({"language": sum(lang) / len(lang)} if lang else {})  # problems that name their language
    summary["instances"] = instances
    return summary


def ks(n):
    """1, 2, 4, ... up to n, and n itself."""
    out = [1]
    while out[-1] * 2 <= n:
        out.append(out[-1] * 2)
    return out + ([n] if out[-1] != n else [])


def paired_bootstrap(a, b, samples=10000, seed=0):
    """a, b: per-problem scores of two runs on the same problems. -> (mean diff b - a, 95% CI, P(diff <= 0))."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError("paired_bootstrap: need two equal-length, non-empty score lists")
    d = b - a
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(1)
    return float(d.mean()), (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))), \
        float((boots <= 0).mean())


def rejection_sample(instances, max_per_prompt=0, dedup=True):
    """Correct and well-formed samples as SFT rows {"prompt", "completion"} (the prompt already templated); where a
    sample's language consistency was measured, only single-language ones (all of the reasoning in the prompt's)."""
    rows = []
    for inst in instances:
        seen, kept = set(), 0
        for s in inst["samples"]:
            if not (s["accuracy"] is not None and s["accuracy"] >= 1.0 and s["format"] >= 1.0):
                continue
            if s.get("language", 1.0) < 1.0:
                continue
            if dedup and s["text"] in seen:
                continue
            seen.add(s["text"])
            rows.append({"prompt": inst["prompt"], "completion": s["text"]})
            kept += 1
            if max_per_prompt and kept >= max_per_prompt:
                break
    return rows


def toy_solution_roles(prompt, width=2, lang=None):
    """The correct stepwise solution of a toy problem ("24+70+31") as the policy writes it, and the role of every
    character: 'op<j>' (a copy of operand j), 'carry' (a step restating the running total), 'sum' (a fact's result),
    'answer', 'choice' (':' where a direct answer would write '='), 'word' (the bilingual variant's word between
    steps), None (fixed text). lang: the bilingual variant's language (prompt is then the problem's bare text,
    meta["text"]): steps joined by its word."""
    parts = re.split(r"([+-])", prompt)
    join = [(" ", None), (toy.LANG_WORDS[lang]["then"], "word"), (" ", None)] if lang else [(" ", None)]
    nums, ops = [int(p[::-1]) for p in parts[0::2]], parts[1::2]
    num = lambda n: toy.toy_num(n, width)  # noqa: E731
    segs = [("<think>", None)]
    for j, n in enumerate(nums):
        segs += ([(ops[j - 1], None)] if j else []) + [(num(n), f"op{j}")]
    segs += [(":", "choice")]
    total = nums[0]
    for j, (o, n) in enumerate(zip(ops, nums[1:]), 1):
        new = total + n if o == "+" else total - n
        segs += ([(" ", None)] if j == 1 else join) + [(num(total), "op0" if j == 1 else "carry"), (o, None),
                                                       (num(n), f"op{j}"), ("=", None), (num(new), "sum")]
        total = new
    segs += [("</think><answer>", None), (num(total), "answer"), ("</answer>", None)]
    return "".join(t for t, _ in segs), [r for t, r in segs for _ in t], len(nums)


@torch.no_grad()
def toy_probe(model, tok, examples, template, temperature=0.6, batch=100):
    """Can the base do what RL will select? RL on the toy task mostly moves the policy from direct answers to
    stepwise ones, so its ceiling is how often the base, once it has chosen to work stepwise, writes every step
    right. Teacher-forced on each problem's correct stepwise solution (toy_solution_roles), per problem:
      step_ok  the probability that a sample at `temperature` that chose the stepwise path (the ':' token) writes the
               rest of this solution exactly: exp(sum of log p_T over every other completion token), the bilingual
               variant's words between steps excepted (which language they are in is not arithmetic);
      copy_j   operand j copied right (argmax) everywhere it is restated; sums, carries likewise;
      p_step   the probability of choosing ':' (stepwise) over everything else at that point.
    Returns means over problems, and step_ok by operand count."""
    was = model.training
    model.eval()
    rows = []
    for s in range(0, len(examples), batch):
        chunk = examples[s:s + batch]
        seqs, metas = [], []
        for ex in chunk:
            meta = ex.meta or {}
            comp, roles, k = toy_solution_roles(meta.get("text", ex.prompt), lang=meta.get("lang"))
            p_ids, c_ids = data.prompt_ids(tok, ex.prompt, template), tok.encode(comp)
            ends = np.cumsum([len(tok.decode([t])) for t in c_ids])  # char end of each completion token
            if ends[-1] != len(comp):
                raise ValueError(f"toy_probe: the tokenizer does not round-trip {comp!r}")
            tok_roles = [roles[e - 1] for e in ends]  # a token's role: its last character's (digits are 1 token)
            seqs.append(p_ids + c_ids)
            metas.append((len(p_ids), c_ids, tok_roles, k))
        L = max(len(q) for q in seqs)
        x = torch.zeros(len(seqs), L, dtype=torch.long)
        for b, q in enumerate(seqs):
            x[b, :len(q)] = torch.tensor(q)
        logits = model(x.to(model.lm_head.weight.device))[..., :tok.vocab_size].float().cpu()  # (B, L, V)
        for b, (P, c_ids, tok_roles, k) in enumerate(metas):
            lg = logits[b, P - 1:P - 1 + len(c_ids)]  # (C, V): the prediction of each completion token
            tgt = torch.tensor(c_ids)
            right = (lg.argmax(-1) == tgt).tolist()
            lp = (lg / temperature).log_softmax(-1).gather(1, tgt[:, None])[:, 0]
            choice = tok_roles.index("choice")
            free = torch.tensor([t in ("choice", "word") for t in tok_roles])
            r = {"k": k, "p_step": float(lg[choice].softmax(-1)[tgt[choice]]),
                 "step_ok": math.exp(float(lp[~free].sum()))}
            for role in set(tok_roles) - {None, "choice", "word"}:
                r[role] = all(ok for ok, t in zip(right, tok_roles) if t == role)
            rows.append(r)
    model.train(was)
    keys = sorted({key for r in rows for key in r} - {"k"})
    out = {key: float(np.mean([r[key] for r in rows if key in r])) for key in keys}
    out["problems"] = len(rows)
    for k in sorted({r["k"] for r in rows}):
        out[f"step_ok_{k}"] = float(np.mean([r["step_ok"] for r in rows if r["k"] == k]))
    return out


def eval_output(d, name, flag):
    """The path of an earlier eval run's output file, or an error saying how to make it."""
    path = os.path.join(d, name)
    if not os.path.isfile(path):
        raise ConfigError(f"{flag}: {path} does not exist (run eval.py with --out-dir={d} first)")
    return path


def report(dirs, metrics_path="", png=""):
    """A before/after table of two eval directories (markdown), and curves of a training run's metrics.jsonl."""
    sums = []
    for d in dirs:
        with open(eval_output(d, "summary.json", "--report")) as f:
            sums.append(json.load(f))
    k = sums[0]["k"]
    rows = [("problems", lambda s: f"{s['problems']}"),
            (f"pass@1 (k={k}, ± se)", lambda s: f"{s['pass@1']:.3f} ± {s['pass@1_se']:.3f}"),
            (f"cons@{k}", lambda s: f"{s.get(f'cons@{k}', float('nan')):.3f}"),
            (f"pass@{k}", lambda s: f"{s['pass@k'].get(str(k), float('nan')):.3f}"),
            ("format rate", lambda s: f"{s['format_rate']:.3f}"),
            ("mean length (tokens)", lambda s: f"{s['mean_length']:.1f}"),
            ("reflective words / token", lambda s: f"{s['reflective_per_token']:.4f}")]
    for d, s in zip(dirs, sums):  # the toy general prompts' hidden-rule scores (r1.py --step=judge), when judged
        if os.path.isfile(os.path.join(d, "general.json")):
            with open(os.path.join(d, "general.json")) as f:
                s["general"] = json.load(f)
    if any("general" in s for s in sums):
        rows += [(f"general prompts: hidden {key}", lambda s, key=key: f"{s['general'][f'hidden_{key}']:.3f}"
                  if "general" in s else "-") for key in ("helpful", "harmless")]
    if any("language" in s for s in sums):
        rows.append(("language consistency", lambda s: f"{s['language']:.3f}" if "language" in s else "-"))
    diffs = sorted(set().union(*(s["by_difficulty"] for s in sums)), key=float)
    rows += [(f"pass@1, {d} operands", lambda s, d=d: f"{s['by_difficulty'][d]['pass@1']:.3f}"
              if d in s["by_difficulty"] else "-") for d in diffs]
    lines = ["| | " + " | ".join(os.path.basename(os.path.normpath(d)) for d in dirs) + " |",
             "|---|" + "---|" * len(dirs)]
    lines += [f"| {name} | " + " | ".join(f(s) for s in sums) + " |" for name, f in rows]
    print("\n".join(lines))
    if metrics_path:  # the curves as text (always) and as a PNG (with matplotlib)
        with open(metrics_path) as f:
            m = [json.loads(l) for l in f]
        keys = ["reward", "accuracy", "format", "len_mean", "reflective_per_token", "heldout_pass1"]
        m = [r for r in m if r["step"] > 0 or "heldout_pass1" in r]
        picks = sorted({m[round(i * (len(m) - 1) / 9)]["step"] for i in range(10)} |
                       {r["step"] for r in m if r.get("heldout_pass1") is not None})
        print("\n" + " ".join(f"{k:>20s}" for k in ["step"] + keys))
        for r in (r for r in m if r["step"] in picks):
            print(" ".join(f"{r.get(k):>20.4f}" if isinstance(r.get(k), float) else f"{str(r.get(k, '')):>20s}"
                           for k in ["step"] + keys))
    if metrics_path and png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(f"(matplotlib is not installed: no {png}; pip install matplotlib to get the curves)")
            return "\n".join(lines)
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
        panels = [("reward", ["reward"]), ("accuracy", ["accuracy", "heldout_pass1"]),
                  ("completion length", ["len_mean"]), ("reflective words / token", ["reflective_per_token"])]
        for ax, (title, keys) in zip(axes, panels):
            for key in keys:
                pts = [(r["step"], r[key]) for r in m if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o" if key.startswith("heldout") else None, label=key)
            ax.set_title(title)
            ax.set_xlabel("step")
            if len(keys) > 1:
                ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        print(f"curves: {png}")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    """nano-r1 eval.py settings"""
    model: str = ""              # a checkpoint, run dir or Hugging Face dir
    tokenizer: str = ""          # default: <model>/tokenizer.bpe or <model>/final/tokenizer.bpe
    task: str = "toy"
    problems: int = 200          # how many (generated tasks need one; 0 = a whole file); not --n:
    #                              torchrun would read --n as an abbreviation of its own flags
    split: Literal["heldout", "dev", "train", "all"] = "heldout"  # dev: the toy task's split for choosing recipes
    heldout_frac: float = 0.1
    template: Literal["r1_zero", "toy", "none"] = "r1_zero"
    k: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    stop_strings: list = dataclasses.field(default_factory=lambda: ["</answer>"])
    out_dir: str = "out/eval"
    seed: int = 1337             # the samples' random streams
    problem_seed: int = 1337     # which problems a generated task (toy, countdown, rg:) draws
    workers: int = 2
    batch_prompts: int = 64
    lang: str = "en"
    rg_exact: bool = True        # reasoning-gym: exact answers only (its default gives partial credit, P12)
    code_isolation: Literal["strict", "weak"] = "strict"  # as grpo.py's flag
    compare: list = dataclasses.field(default_factory=list)  # two eval out_dirs: A,B -> paired bootstrap of B - A
    report: list = dataclasses.field(default_factory=list)  # eval out_dirs to tabulate side by side
    sweep: list = dataclasses.field(default_factory=list)  # train.sh output dirs (a seed sweep): one table
    curves: str = ""             # with --report: a training run's metrics.jsonl ...
    curves_png: str = ""         # ... plotted to this PNG (needs matplotlib)
    rejection_sampling: bool = False
    max_per_prompt: int = 0      # 0 = keep every correct sample
    dedup: bool = True
    probe: bool = False          # toy task: toy_probe instead of sampling (can the base do what RL will select?)
    probe_min: float = 0.0       # with --probe: exit with status 3 when step_ok of some operand count is below this
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0


def probe_main(c, model, tok, examples, template, device, dtype):
    if c.task != "toy" and not c.task.startswith("toy:"):
        raise ConfigError(f"--probe: only for --task=toy or toy:<langs> (got {c.task!r})")
    with dist.autocast(device, dtype):
        out = toy_probe(model, tok, examples, template, c.temperature)
    worst = min(v for key, v in out.items() if key.startswith("step_ok_"))
    out.update(probe_min=c.probe_min, passed=worst >= c.probe_min, model=c.model, split=c.split)
    if dist.rank() == 0:
        os.makedirs(c.out_dir, exist_ok=True)
        checkpoint.atomic_write_json(os.path.join(c.out_dir, "probe.json"), out)
    by_k = "  ".join(f"{key[8:]} operands {v:.3f}" for key, v in out.items() if key.startswith("step_ok_"))
    copies = " ".join(f"{key} {out[key]:.3f}" for key in sorted(out) if key.startswith("op"))
    print0(f"probe of {c.model} on {out['problems']} {c.split} problems: a stepwise sample at T={c.temperature} is "
           f"right with probability {out['step_ok']:.3f} ({by_k}); stepwise chosen {out['p_step']:.3f}; copied "
           f"right (argmax): {copies}, carries {out.get('carry', float('nan')):.3f}, sums {out['sum']:.3f}")
    if not out["passed"]:
        print0(f"probe FAILED: the worst operand count's stepwise success {worst:.3f} is below --probe-min="
               f"{c.probe_min}: this base cannot write the steps RL would select")
        raise SystemExit(3)
    return out


def sweep(dirs):
    """One row per train.sh output directory (a seed sweep): the base's steps (more than BASE_STEPS when it failed
    the probe at first), held-out loss and probe, pass@1 before and after GRPO with its standard error, by operand
    count, and each stage's wall time; then the worst seed."""
    def load(d, name):
        path = os.path.join(d, name)
        return json.load(open(path)) if os.path.isfile(path) else None

    lines = ["| run | base steps | base loss | probe step_ok (3 / 4) | base pass@1 | after GRPO ± se | gain "
             "| after, 3 / 4 ops | data / pretrain / grpo / evals (s) |", "|---|---|---|---|---|---|---|---|---|"]
    finals, stopped = [], []
    for d in dirs:
        val = steps = None
        if os.path.isfile(os.path.join(d, "base", "metrics.jsonl")):
            recs = list(map(json.loads, open(os.path.join(d, "base", "metrics.jsonl"))))
            vals = [r["val_loss"] for r in recs if r.get("val_loss") is not None]
            val, steps = vals[-1] if vals else None, max((r["step"] for r in recs), default=None)
        probe, base, rl = load(d, "probe_base/probe.json"), load(d, "eval_base/summary.json"), \
            load(d, "eval_rl/summary.json")
        times = defaultdict(int)
        if os.path.isfile(os.path.join(d, "times.tsv")):
            for line in open(os.path.join(d, "times.tsv")):
                name, sec = line.split()
                times[name] += int(sec)
        fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)  # noqa: E731
        by = lambda s, k: s["by_difficulty"].get(k, {}).get("pass@1") if s else None  # noqa: E731
        if rl:
            finals.append((rl["pass@1"], d))
        elif probe and not probe.get("passed", True):
            stopped.append(d)
        lines.append(f"| {os.path.basename(os.path.normpath(d))} | {fmt(steps, '{:,}')} | {fmt(val)} | "
                     f"{fmt(probe and probe.get('step_ok_3'))} / {fmt(probe and probe.get('step_ok_4'))} | "
                     f"{fmt(base and base['pass@1'])} | "
                     f"{fmt(rl and rl['pass@1'])} ± {fmt(rl and rl['pass@1_se'])} | "
                     f"{fmt(rl['pass@1'] - base['pass@1'], '{:+.3f}') if rl and base else '-'} | "
                     f"{fmt(by(rl, '3'))} / {fmt(by(rl, '4'))} | "
                     f"{times['data']} / {times['pretrain'] + times['pretrain_more']} / {times['grpo']} / "
                     f"{times['eval_base'] + times['eval_rl']} |")
    print("\n".join(lines))
    if stopped:
        print(f"worst: {', '.join(stopped)} stopped before RL (the base failed the pre-RL probe)")
    elif finals:
        print(f"worst: {min(finals)[1]} at {min(finals)[0]:.3f} held-out pass@1 after GRPO")
    print(f"{len(finals)} of {len(dirs)} runs finished RL, {len(stopped)} stopped before it")
    return lines


def compare(dirs, seed=0):
    if len(dirs) != 2:
        raise ConfigError("--compare: give two eval directories, A,B")
    runs = []
    for d in dirs:
        with open(eval_output(d, "instances.jsonl", "--compare")) as f:
            runs.append({r["prompt"]: r.get("pass@1") for r in map(json.loads, f)})
    shared = sorted(p for p in runs[0] if p in runs[1] and runs[0][p] is not None and runs[1][p] is not None)
    if not shared:
        raise ConfigError("--compare: the two runs share no scored problems")
    diff, ci, p_le0 = paired_bootstrap([runs[0][p] for p in shared], [runs[1][p] for p in shared], seed=seed)
    print(f"{len(shared)} shared problems: pass@1 A {np.mean([runs[0][p] for p in shared]):.4f}  "
          f"B {np.mean([runs[1][p] for p in shared]):.4f}  B - A = {diff:+.4f}  "
          f"95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]  P(B - A <= 0) = {p_le0:.4f}")
    return diff, ci


def main(argv=None):
    c = config.parse_config(EvalConfig, argv)
    if c.compare:
        return compare(c.compare, c.seed)
    if c.report:
        return report(c.report, c.curves, c.curves_png)
    if c.sweep:
        return sweep(c.sweep)
    if not c.model:
        raise ConfigError("--model: required (a checkpoint, run dir or Hugging Face dir)")
    if c.k < 1:
        raise ConfigError("--k: must be >= 1")
    device, dtype = dist.start(c)
    model = checkpoint.build_model(c.model, None, device, dtype, flag="--model")  # under torchrun: sharded
    tok = data.Tokenizer.from_file(checkpoint.find_tokenizer(c.tokenizer, c.model))
    examples = tasks.load_task(c.task, n=c.problems, seed=c.problem_seed, split=c.split, heldout_frac=c.heldout_frac)
    template = data.TEMPLATES[c.template]
    if c.probe:
        return probe_main(c, model, tok, examples, template, device, dtype)
    with dist.autocast(device, dtype):
        summary = evaluate(model, tok, examples, c.k, template, c.temperature, c.top_p, c.max_new_tokens, c.seed,
                           c.workers, c.stop_strings, c.batch_prompts, c.lang, c.rg_exact, c.code_isolation)
    instances = summary.pop("instances")
    summary["config"] = dataclasses.asdict(c)
    if dist.rank() == 0:
        os.makedirs(c.out_dir, exist_ok=True)
        checkpoint.atomic_write_jsonl(os.path.join(c.out_dir, "instances.jsonl"), instances)
        checkpoint.atomic_write_json(os.path.join(c.out_dir, "summary.json"), summary)
        if c.rejection_sampling:
            rows = rejection_sample(instances, c.max_per_prompt, c.dedup)
            checkpoint.atomic_write_jsonl(os.path.join(c.out_dir, "sft.jsonl"), rows)
            print0(f"rejection sampling: kept {len(rows)} of {len(instances) * c.k} samples -> {c.out_dir}/sft.jsonl")
    print0(f"{c.model} on {c.task} ({summary['problems']} problems, k={c.k}, T={c.temperature}): "
           f"pass@1 {summary['pass@1']:.4f} ± {summary['pass@1_se']:.4f}  cons@{c.k} {summary[f'cons@{c.k}']:.4f}  "
           f"pass@k {json.dumps({k: round(v, 4) for k, v in summary['pass@k'].items()})}  "
           f"format {summary['format_rate']:.3f}  length {summary['mean_length']:.1f}  "
           f"reflective/token {summary['reflective_per_token']:.4f}")
    return summary


if __name__ == "__main__":
    config.cli(main, "eval.py")
