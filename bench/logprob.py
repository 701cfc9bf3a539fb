"""Peak memory and time of forward+backward per-token log-probs: kernels.token_logprobs (torch chunked path, the
CPU default) against the naive `log_softmax(h @ W.T).gather(...)` that TRL-style trainers write.

    python bench/logprob.py [--n=4096] [--d=512] [--v=32000] [--iters=3] [--threads=2] [--entropy=none|logged|grad]

Work: hidden (N, D) and LM head (V, D) in fp32, random targets, T=1; loss = sum(logp * g) with a fixed random g,
backward to both h and W. --entropy=logged also computes the entropy without differentiating it (what grpo.py does
every step); --entropy=grad adds sum(entropy * g2) to the loss. Goal (issue 6): <= 1/4 of the naive peak memory,
no slower. The chunked path does 4 matmul passes over (N, V, D) instead of 3 (its backward recomputes the logits)
and wins time back only through fewer passes over (N, V) memory, so expect it near parity on CPU at D=512.

Memory: each variant runs in its own fresh subprocess (no allocator cache or earlier peak of the other variant
leaks in). After the inputs exist and one warm-up iteration has run (thread pools, one-off buffers), the process
resets its kernel-tracked peak RSS (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), reads its current RSS as the
baseline, runs one forward+backward and reports peak RSS (VmHWM) minus the baseline: the memory the computation
itself needed on top of the inputs (including the h and W gradients, the same for both). These workers run with
MALLOC_MMAP_THRESHOLD_=65536, so glibc mmaps every allocation of 64 KB or more and unmaps it on free: RSS then
follows live tensors (otherwise memory freed by the warm-up stays resident in the heap and is silently reused).
Time: a third subprocess alternates the two variants --iters times (so a load change on a shared machine hits
both alike) and reports each one's median. Other processes on the same cores still inflate both times.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"bench/logprob.py: {key} not found in /proc/self/status (Linux only)")


def worker(a):
    """One variant in this (fresh) process; prints one JSON line."""
    sys.path.insert(0, ROOT)
    import torch
    import kernels
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(a.n, a.d, generator=gen).requires_grad_(True)  # (N, D)
    w = (torch.randn(a.v, a.d, generator=gen) / a.d**0.5).requires_grad_(True)  # (V, D)
    t = torch.randint(0, a.v, (a.n,), generator=gen)  # (N,)
    g1, g2 = torch.randn(a.n, generator=gen), torch.randn(a.n, generator=gen)

    def naive():
        lq = torch.log_softmax(h @ w.T, dim=-1)  # (N, V) fp32 logits, then (N, V) log-probs
        loss = (lq.gather(1, t[:, None]).squeeze(1) * g1).sum()
        if a.entropy == "grad":
            loss = loss + (-(lq.exp() * lq).sum(-1) * g2).sum()
        elif a.entropy == "logged":
            with torch.no_grad():
                (-(lq.exp() * lq).sum(-1)).sum().item()
        return loss

    def chunked():
        out = kernels.token_logprobs(h, w, t, backend="torch", return_entropy=a.entropy != "none", chunk=a.chunk)
        if a.entropy == "none":
            return (out * g1).sum()
        if a.entropy == "logged":
            out[1].detach().sum().item()
            return (out[0] * g1).sum()
        return (out[0] * g1).sum() + (out[1] * g2).sum()

    def step(fn):
        loss = fn()
        loss.backward()
        h.grad = w.grad = None
        return loss.item()

    fns = dict(naive=naive, chunked=chunked)
    if a.variant == "time":
        times = {k: [] for k in fns}
        warm = {k: step(fn) for k, fn in fns.items()}  # warm-up, and a check that both compute the same loss
        if abs(warm["naive"] - warm["chunked"]) > 1e-4 * (1 + abs(warm["naive"])):
            sys.exit(f"bench/logprob.py: the variants disagree: {warm}")
        for _ in range(a.iters):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                step(fn)
                times[k].append(time.perf_counter() - t0)
        print(json.dumps(times))
        return
    step(fns[a.variant])  # warm-up
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    base = status_kb("VmRSS")
    step(fns[a.variant])
    print(json.dumps(dict(peak_mb=(status_kb("VmHWM") - base) / 1024)))


def run(variant):
    cmd = [sys.executable, os.path.abspath(__file__), f"--variant={variant}"] + sys.argv[1:]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if variant != "time":  # every allocation >= 64 KB is mmap'ed and given back on free, so RSS == live memory
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"bench/logprob.py: the {variant} worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--entropy", choices=["none", "logged", "grad"], default="none",
                   help="logged: also compute the entropy (no grad), as grpo.py does; grad: backprop through it too")
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: kernels' ~64 MB of logits)")
    p.add_argument("--variant", choices=["naive", "chunked", "time"], help=argparse.SUPPRESS)  # worker mode
    a = p.parse_args()
    if a.variant:
        return worker(a)
    print(f"N={a.n} D={a.d} V={a.v} fp32, forward+backward, entropy={a.entropy}, {a.threads} threads")
    mem = {k: run(k)["peak_mb"] for k in ("naive", "chunked")}
    times = run("time")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("naive", "chunked"):
        print(f"  {k:8s} peak {mem[k]:8.1f} MB above inputs   time {med[k]:7.3f} s median "
              f"(runs {', '.join(f'{x:.3f}' for x in times[k])})")
    print(f"chunked / naive: memory {mem['chunked'] / mem['naive']:.3f} (goal <= 0.25), "
          f"time {med['chunked'] / med['naive']:.3f} (goal <= 1)")


if __name__ == "__main__":
    main()
