"""Peak memory and time of forward+backward per-token log-probs: kernels.token_logprobs (torch chunked path, the
CPU default) against the naive `log_softmax(h @ W.T / T).gather(...)` that TRL-style trainers write.

    python bench/logprob.py [--n=4096] [--d=512] [--v=32000] [--iters=3] [--threads=2] [--entropy] [--chunk=N]

Work: hidden (N, D) and LM head (V, D) in fp32, random targets, T=1; loss = sum(logp * g) with a fixed random g
(plus the entropy likewise with --entropy), backward to both h and W. Goal (issue 6): <= 1/4 of the naive peak
memory, no slower. The chunked path does 4 matmul passes over (N, V, D) instead of 3 (the backward recomputes the
logits) but never holds more than one chunk of (rows, V) fp32 logits.

How memory is measured: each variant runs in its own fresh subprocess (so no allocator cache or earlier peak from
the other variant leaks in). After the inputs exist and one warm-up iteration has run (thread pools, one-off
buffers), the process resets its kernel-tracked peak RSS (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), reads
its current RSS as the baseline, runs one more forward+backward, and reports peak RSS (VmHWM) minus that baseline:
the memory the computation itself needed on top of the inputs (this includes the h and W gradients, the same for
both). Large tensors are mmap'ed by glibc and returned on free, so RSS follows live tensors closely; small-malloc
noise is a few MB. Time: median of --iters forward+backward runs in the same subprocess. Run it on a quiet
machine: a second busy process on 2 cores distorts the time (not the memory).
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
        if a.entropy:
            loss = loss + (-(lq.exp() * lq).sum(-1) * g2).sum()
        return loss

    def chunked():
        out = kernels.token_logprobs(h, w, t, backend="torch", return_entropy=a.entropy, chunk=a.chunk)
        return (out[0] * g1).sum() + (out[1] * g2).sum() if a.entropy else (out * g1).sum()

    fn = naive if a.variant == "naive" else chunked

    def step():
        fn().backward()
        h.grad = w.grad = None

    step()  # warm-up
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    base = status_kb("VmRSS")
    step()
    peak = status_kb("VmHWM")
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(variant=a.variant, peak_mb=(peak - base) / 1024, base_mb=base / 1024,
                          time_s=statistics.median(times), times=times)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--entropy", action="store_true", help="also compute the entropy and backprop through it")
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: kernels' ~64 MB of logits)")
    p.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)  # worker mode
    a = p.parse_args()
    if a.variant:
        return worker(a)
    print(f"N={a.n} D={a.d} V={a.v} fp32, forward+backward{' with entropy' if a.entropy else ''}, "
          f"{a.threads} threads, median of {a.iters}; peak = RSS high-water mark above the inputs (fresh process)")
    res = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, os.path.abspath(__file__), f"--variant={variant}"] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
        if out.returncode != 0:
            sys.exit(f"bench/logprob.py: the {variant} worker failed:\n{out.stderr}")
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[variant]
        print(f"  {variant:8s} peak {r['peak_mb']:8.1f} MB   time {r['time_s']:7.3f} s   "
              f"(runs {', '.join(f'{x:.3f}' for x in r['times'])})")
    n, c = res["naive"], res["chunked"]
    print(f"chunked / naive: memory {c['peak_mb'] / n['peak_mb']:.3f} (goal <= 0.25), "
          f"time {c['time_s'] / n['time_s']:.3f} (goal <= 1)")


if __name__ == "__main__":
    main()
