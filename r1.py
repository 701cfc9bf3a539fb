"""The data steps of the DeepSeek-R1 pipeline (paper Fig. 2) between the training runs `bash train.sh r1` chains:

    python r1.py --step=cold_start --samples=out/r1/zero_samples --out=out/r1/cold_start.jsonl
    python r1.py --step=general --out=out/r1/general
    python r1.py --step=mix --samples=out/r1/rs/sft.jsonl --general=out/r1/general/sft.jsonl --out=out/r1/mix.jsonl

cold_start  R1-Zero's samples on training prompts (an eval.py output dir, sampled at T=1 as the paper did) -> the
            correct, well-formed, readable ones: all of the reasoning in the prompt's language (no mixing), not
            repetitive, at most --max-tokens tokens -> rewritten into the readable format: the reasoning between
            <think> and </think>, then a summary for the reader between <answer> and </answer> in the prompt's
            language: the answer, as R1-Zero's answer block had it, then the answer boxed and the problem it answers
            ("49, so \\boxed{49} = 04+32+91+21"; rewards read the last \\boxed{} of the answer block, so accuracy and
            format score it as before). The answer comes first because the model copies it from the last step, and
            the base already copies it right after <answer>; with the problem restated first, the copy reached 37
            tokens back, past numbers like it, and some seeds' cold starts boxed wrong sums (README: "The stages").
            The paper also had humans and DeepSeek-V3 rewrite and translate; the toy keeps only what needs no model.
            One row per (prompt, distinct text), at most --per-prompt per prompt.
general     the toy general prompts' data (toy.py): preference pairs from the hidden rule for the helpful reward
            model (replies only) and the harmless one (whole responses), and SFT rows of a careless annotator's
            replies for the rejection-sampling SFT mix. --length-biased: a biased annotator's pairs, who judges
            politeness as the rule does but prefers the longer of two equally polite replies, so reward models
            trained on them reward rambling, which the rule penalises (the reward-hacking run).
mix         rejection-sampled reasoning rows + general rows, shuffled (sft.py holds out the last rows for
            validation, so both kinds must be spread through the file).
hacking     the all-scenario run's reward-model scores beside the hidden rule's, per step (text, and a PNG with
            matplotlib): reward hacking is the first rising while the second falls.
judge       a model's replies to the held-out general prompts (k each, T=0.6), scored by the hidden rule
            (toy.hidden_helpful on the reply, toy.hidden_harmless on the whole response) and the format reward ->
            <out>/general.json, which eval.py --report shows beside pass@1 when it sits in an eval directory.
"""
import os
import random
from dataclasses import dataclass
from typing import Literal

import torch

import checkpoint
import config
import data
import rewards
import rollout
import toy
from config import ConfigError


@dataclass
class R1DataConfig:
    """nano-r1 r1.py: the R1 pipeline's data steps"""
    step: Literal["cold_start", "general", "mix", "judge", "hacking"] = "cold_start"
    samples: str = ""            # cold_start: an eval.py output dir (instances.jsonl); mix: SFT .jsonl files
    general: str = ""            # mix: the general SFT rows (r1.py --step=general's sft.jsonl)
    out: str = ""                # a .jsonl file (cold_start, mix) or a directory (general)
    max_tokens: int = 72         # cold_start: longer samples are not kept
    per_prompt: int = 2          # cold_start: at most this many rewritten samples per prompt
    max_repeat: float = 0.25     # cold_start: a sample whose reasoning repeats more of its word 3-grams is dropped
    pairs: int = 2000            # general: preference pairs per reward model
    length_biased: bool = False  # general: a biased annotator chooses: longer wins among equally polite replies
    general_rows: int = 400      # general: SFT rows of general prompts
    model: str = ""              # judge: the policy (a run or Hugging Face directory)
    metrics: str = ""            # hacking: the all-scenario run's metrics.jsonl
    k: int = 4                   # judge: replies per held-out general prompt
    max_new_tokens: int = 72
    threads: int = 0
    seed: int = 1


def repeated_share(text, n=3):
    """The share of a text's word n-grams that repeat an earlier one (0 for a text of fewer than n words)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def readable(sample, max_tokens, max_repeat):
    """Correct, well formed, one language, not repetitive, not too long: the paper's cold-start filters."""
    reasoning = sample["text"].split("<think>", 1)[-1].split("</think>", 1)[0]
    return (sample["accuracy"] is not None and sample["accuracy"] >= 1.0 and sample["format"] >= 1.0
            and sample.get("language", 1.0) >= 1.0 and sample["tokens"] <= max_tokens
            and repeated_share(reasoning) <= max_repeat)


def rewrite(text, problem, lang):
    """A well-formed R1-Zero sample -> the readable format: its reasoning, then a summary in the prompt's language:
    the answer, then the answer boxed and the problem it answers. The answer is what the sample's answer block said."""
    reasoning = text.split("<think>", 1)[1].split("</think>", 1)[0]
    answer = text.split("<answer>", 1)[1].split("</answer>", 1)[0].strip()
    so = toy.LANG_WORDS[lang]["so"]
    return f"<think>{reasoning}</think><answer>{answer}, {so} \\boxed{{{answer}}} = {problem}</answer>"


def cold_start(instances, max_tokens, per_prompt, max_repeat):
    rows, seen = [], set()
    for inst in instances:
        if "text" not in inst:
            raise ConfigError("--samples: the instances carry no problem text and language: sample R1-Zero on the "
                              "bilingual toy task (eval.py --task=toy:en,zh)")
        kept = 0
        for s in inst["samples"]:
            if kept < per_prompt and readable(s, max_tokens, max_repeat) and (inst["prompt"], s["text"]) not in seen:
                seen.add((inst["prompt"], s["text"]))
                rows.append({"prompt": inst["prompt"], "completion": rewrite(s["text"], inst["text"], inst["lang"])})
                kept += 1
    return rows


@torch.no_grad()
def judge(model, tok, examples, k, max_new_tokens, seed):
    """k replies to each general prompt at T=0.6 (eval.py's protocol) -> the hidden rule's means and the format rate."""
    stop_ids = rollout.stop_ids_for(model, tok)
    out = rollout.generate(model, [data.prompt_ids(tok, e.prompt, data.TOY_TEMPLATE) for e in examples],
                           max_new_tokens, 0.6, 0.95, num_samples=k, stop_ids=stop_ids, stop_strings=["</answer>"],
                           decode=tok.decode, vocab_size=tok.vocab_size, seed=seed)
    texts = rollout.completion_texts(tok, out, stop_ids)
    mean = lambda f: sum(map(f, texts)) / len(texts)  # noqa: E731
    return {"prompts": len(examples), "k": k, "hidden_helpful": mean(toy.hidden_helpful),
            "hidden_harmless": mean(toy.hidden_harmless), "format_rate": mean(rewards.format_reward),
            "mean_length": sum(map(len, out.tokens)) / len(texts), "samples": texts[:8]}


def hacking(rows, png):
    """The reward models' mean scores and the hidden rule's over the steps that had general prompts, and each one's
    mean over the first and the last third of those steps (one step has only a few general prompts: noisy)."""
    keys = ["rm_helpful", "rm_harmless", "hidden_helpful", "hidden_harmless", "accuracy"]
    rows = [r for r in rows if r.get("general_outputs")]
    if not rows:
        raise ConfigError("--metrics: no step with general prompts (grpo.py --general-frac > 0)")
    print(" ".join(f"{k:>16s}" for k in ["step"] + keys))
    for r in rows:
        print(" ".join(f"{r.get(k, float('nan')):>16.4f}" if k != "step" else f"{r[k]:>16d}" for k in ["step"] + keys))
    n = max(1, len(rows) // 3)
    mean = lambda rs, k: sum(r.get(k, float("nan")) for r in rs) / len(rs)  # noqa: E731
    print(f"first {n} -> last {n} of these steps (means): " +
          ", ".join(f"{k} {mean(rows[:n], k):.3f} -> {mean(rows[-n:], k):.3f}" for k in keys))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no {png})")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    steps = [r["step"] for r in rows]
    for ax, ks in ((a, keys[:2]), (b, keys[2:])):
        for k in ks:  # each step faint, the mean of the last 5 steps bold
            y = [r.get(k, float("nan")) for r in rows]
            line, = ax.plot(steps, y, alpha=0.3)
            windows = (y[max(0, i - 4):i + 1] for i in range(len(y)))
            ax.plot(steps, [sum(w) / len(w) for w in windows], color=line.get_color(), label=f"{k} (5-step mean)")
    a.set_title("reward models' scores (the reward)")
    b.set_title("hidden rule and accuracy (what we want)")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"reward hacking curve: {png}")


def main(argv=None):
    c = config.parse_config(R1DataConfig, argv)
    config.need(c.out, "out", "an output path is required")
    rng = random.Random(c.seed)
    if c.step == "cold_start":
        path = os.path.join(c.samples, "instances.jsonl")
        config.need(os.path.isfile(path), "samples", f"{path} does not exist (run eval.py --out-dir={c.samples})")
        instances = [obj for _, obj in data.read_rows(path)]
        rows = cold_start(instances, c.max_tokens, c.per_prompt, c.max_repeat)
        n = sum(len(i["samples"]) for i in instances)
        print(f"cold start: kept {len(rows)} of {n} samples ({len(instances)} prompts) -> {c.out}")
        if not rows:
            raise ConfigError(f"--samples: no sample of {path} passed the filters (correct, one language, at most "
                              f"--max-tokens={c.max_tokens} tokens, repeats <= --max-repeat={c.max_repeat})")
        checkpoint.atomic_write_jsonl(c.out, rows)
    elif c.step == "general":
        os.makedirs(c.out, exist_ok=True)
        train = toy.general_prompts("train")
        for kind in ("helpful", "harmless"):
            pairs = toy.preference_pairs(train, c.pairs, kind, c.seed, c.length_biased)
            checkpoint.atomic_write_jsonl(os.path.join(c.out, f"pairs_{kind}.jsonl"), pairs)
        rows = [{"prompt": data.apply_template(data.TOY_TEMPLATE, ex.prompt), "completion": toy.careless_reply(ex, rng)}
                for ex in (rng.choice(train) for _ in range(c.general_rows))]
        checkpoint.atomic_write_jsonl(os.path.join(c.out, "sft.jsonl"), rows)
        print(f"general: {c.pairs} helpful and {c.pairs} harmless pairs{' (length-biased)' * c.length_biased}, "
              f"{len(rows)} SFT rows -> {c.out}")
    elif c.step == "hacking":
        config.need(os.path.isfile(c.metrics), "metrics", f"{c.metrics!r}: no such file")
        hacking([obj for _, obj in data.read_rows(c.metrics)], c.out)
    elif c.step == "judge":
        config.need(c.model, "model", "a policy to judge is required")
        torch.set_num_threads(c.threads or torch.get_num_threads())
        model = checkpoint.load_model(c.model).eval()
        tok = data.Tokenizer.from_file(checkpoint.find_tokenizer("", c.model))
        res = judge(model, tok, toy.general_prompts("heldout"), c.k, c.max_new_tokens, c.seed)
        checkpoint.atomic_write_json(os.path.join(c.out, "general.json"), res)
        print(f"{c.model} on {res['prompts']} held-out general prompts (k={c.k}): hidden rule helpful "
              f"{res['hidden_helpful']:.3f}, harmless {res['hidden_harmless']:.3f}; format {res['format_rate']:.3f}")
    else:
        files = [p for p in (c.samples.split(",") + [c.general]) if p]
        for p in files:
            config.need(os.path.isfile(p), "samples" if p != c.general else "general", f"{p} does not exist")
        rows = [obj for p in files for _, obj in data.read_rows(p)]
        rng.shuffle(rows)
        checkpoint.atomic_write_jsonl(c.out, rows)
        print(f"mix: {len(rows)} rows from {', '.join(files)} -> {c.out}")


if __name__ == "__main__":
    config.cli(main, "r1.py")
