"""A GRPO update over micro-batches cut from the rows ordered by length (loss.length_chunks, what grpo.train_step
does) against micro-batches taken in rollout order (what a trainer that pads each micro-batch of its data loader
does), on the same rollout, interleaved.

    python bench/microbatch.py [--rows=128] [--micro=16] [--median-len=48] [--max-len=384] [--reps=5] [--threads=2]

The rollout: `rows` outputs of a 24-token prompt, G=8 per prompt, completion lengths drawn from a log-normal
(median --median-len, sigma 0.8, capped at --max-len): a long right tail, as reasoning outputs have. The model is
the CPU default's shape (2.8M-parameter MoE). Each variant runs grpo.train_step (forward, loss, backward, AdamW) on
its own copy of the model; the two take turns. Printed: padded positions (what a forward computes on), seconds per
update, and the ratio. On a GPU the forward and backward cost follows the padded positions the same way (attention
by their square), so the padding ratio is the estimate there. Run it alone.
"""
import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import config  # noqa: E402
import grpo  # noqa: E402
import loss  # noqa: E402
import optim  # noqa: E402
import rollout  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--median-len", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    mcfg = ModelConfig(max_position_embeddings=1024)
    V = mcfg.vocab_size
    lens = (a.median_len * torch.exp(0.8 * torch.randn(a.rows, generator=g))).round().clamp(1, a.max_len).long()
    prompts = [torch.randint(0, V, (24,), generator=g).tolist() for _ in range(a.rows // 8)]
    comps = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in lens]
    b = rollout.make_batch([p for p in prompts for _ in range(8)], comps, [[0.0] * len(x) for x in comps],
                           torch.randn(a.rows, generator=g).tolist())
    c = config.parse_config(grpo.GRPOConfig, ["--preset=cpu", "--init-from=x", f"--micro-batch-size={a.micro}"],
                            grpo.PRESETS)
    torch.manual_seed(0)
    base = Transformer(mcfg).train()
    total = b.prompt_len + b.comp_len - 1  # (B,) input positions per row
    # the two ways to cut micro-batches, each swapped in for loss.length_chunks (train_step's and old_logprobs')
    cutters = {"by length": loss.length_chunks, "rollout order": lambda b, rows, n: list(rows.split(n))}
    padded = {name: sum(len(ch) * int(total[ch].max()) for ch in cut(b, torch.arange(a.rows), a.micro))
              for name, cut in cutters.items()}
    sides = {}
    for name in padded:
        m = copy.deepcopy(base)
        sides[name] = (m, optim.adamw(m, c.lr))
    times = {name: [] for name in padded}
    for rep in range(1 + a.reps):  # the first round warms up
        for name, (m, opt) in sides.items():
            loss.length_chunks = cutters[name]
            t = time.perf_counter()
            grpo.train_step(m, None, opt, b, c, V, on_policy=True)
            if rep:
                times[name].append(time.perf_counter() - t)
    loss.length_chunks = cutters["by length"]
    print(f"GRPO update: {a.rows} outputs (24-token prompts, completions {int(lens.min())}-{int(lens.max())} tokens, "
          f"median {int(lens.median())}, {int(lens.sum())} in all) in micro-batches of {a.micro}; "
          f"{base.num_params() / 1e6:.1f}M-param MoE, fp32 CPU, {a.threads} threads; median of {a.reps}, interleaved")
    real = int(total.sum())
    for name in padded:
        print(f"  {name:14s} padded positions {padded[name]:7d} ({padded[name] / real:.2f}x the real {real})   "
              f"{statistics.median(times[name]):.3f} s (min {min(times[name]):.3f})")
    t_len, t_ord = (statistics.median(times[n]) for n in padded)
    print(f"  by length / rollout order: positions {padded['by length'] / padded['rollout order']:.2f}x, "
          f"time {t_len / t_ord:.2f}x")


if __name__ == "__main__":
    main()
