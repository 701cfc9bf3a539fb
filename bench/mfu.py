"""Model FLOP/s utilisation on this CPU: the measured matmul peaks (fp32 and bf16), and the FLOP/s that sft.py's
pretraining and grpo.py's training phase reach with the toy model, as fractions of the fp32 peak.

    python bench/mfu.py [--base=out/toy/base] [--data=out/toy/data] [--threads=2]

Needs the toy run's files (bash train.sh). Runs sft.py for 60 steps (train.sh's pretraining flags, a throwaway
out-dir) and grpo.py --preset=cpu for 8 steps from the base, and reads their own tokens/s. Run it alone.

FLOPs counted per token (the 6N rule made explicit): 6 x the matmul weights a token goes through (every 2-D
weight but the embedding table: attention projections, dense MLP, router, shared expert, K of the E routed
experts, LM head) plus causal attention, 6 x layers x heads x (qk + v head dims) x (mean context), the mean
context being (T + 1) / 2 for a T-token sequence. Training = forward (2) + backward (4). grpo.py's training phase
at the cpu preset is one forward and backward per token (on-policy, no reference model), so the same 6 applies;
its tokens are the real prompt + completion tokens (padding counts as waste, not as work).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import toy  # noqa: E402


def matmul_peak(dtype, sizes=(512, 1024, 2048), reps=5):
    """Best GFLOP/s of torch.mm over square sizes (the CPU's attainable peak for that dtype through torch)."""
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm-up
        k = max(1, int(2e10 // (2 * n ** 3)))  # ~20 GFLOP per timing
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(k):
                torch.mm(a, b)
            times.append(time.perf_counter() - t)
        best[n] = 2 * n ** 3 * k / min(times) / 1e9
    return best


def model_shape_gflops(dtype, N=4096, D=128, F=384, reps=20):
    """GFLOP/s of one of the toy model's own matmuls (4,096 tokens x 128 -> 384): the ceiling its small shapes allow."""
    x, w = torch.randn(N, D).to(dtype), torch.randn(F, D).to(dtype)
    torch.nn.functional.linear(x, w)
    t = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return 2 * N * D * F * reps / (time.perf_counter() - t) / 1e9


def flops_per_token(model, ctx):
    """Training FLOPs per token (see the module docstring) and the active matmul weights behind them."""
    cfg = model.config
    E, K = max(1, cfg.n_routed_experts), cfg.num_experts_per_tok
    active = sum(p.numel() * (K / E if ".experts." in name else 1) for name, p in model.named_parameters()
                 if p.dim() >= 2 and "embed_tokens" not in name)
    if cfg.kv_lora_rank:  # MLA: per-head query/key dims nope + rope, value dims v
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * (qk + v) * ctx
    return 6 * (active + attn), active


def run(cmd, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench/mfu.py: {' '.join(cmd[:2])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def metrics(path):
    return [json.loads(line) for line in open(path)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="out/toy/base")
    ap.add_argument("--data", default="out/toy/data")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    for p in (os.path.join(a.base, "final", "config.json"), os.path.join(a.data, "corpus.txt")):
        if not os.path.isfile(os.path.join(ROOT, p)):
            sys.exit(f"bench/mfu.py: {p} not found: run bash train.sh first (or pass --base/--data)")
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} CPUs")
    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = matmul_peak(dtype)
        peak[dtype] = max(best.values())
        print(f"matmul peak {str(dtype)[6:]:>8}: " + ", ".join(f"n={n} {g:.0f}" for n, g in best.items()) +
              f" GFLOP/s; the model's 4096x128 @ 128x384: {model_shape_gflops(dtype):.0f} GFLOP/s")
    model = checkpoint.load_model(os.path.join(ROOT, a.base))
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        # pretraining: train.sh's flags, 60 steps; the first 20 are warm-up
        run([py, "sft.py", f"--data={a.data}/corpus.txt", f"--tokenizer={a.data}/tokenizer.bpe",
             f"--out-dir={tmp}/sft", "--num-attention-heads=8", "--max-steps=60", "--batch-size=32", "--seq-len=128",
             "--lr=2e-3", "--warmup-steps=10", "--log-every=10", "--eval-every=1000", "--ckpt-every=1000",
             f"--threads={a.threads}", "--seed=1"], a.threads)
        tok_s = statistics.median(m["tokens_per_s"] for m in metrics(f"{tmp}/sft/metrics.jsonl")[20:]
                                  if "tokens_per_s" in m)
        f_tok, active = flops_per_token(model, (128 + 1) / 2)
        rows = [("sft.py pretraining (32 x 128 tokens a step)", tok_s, f_tok)]
        # GRPO: the cpu preset from the base; training phase only (sampling is timed separately)
        run([py, "grpo.py", "--preset=cpu", f"--init-from={a.base}", f"--out-dir={tmp}/rl", "--max-steps=8",
             "--eval-every=1000", "--ckpt-every=1000"], a.threads)
        ms = [m for m in metrics(f"{tmp}/rl/metrics.jsonl") if "train_tok_s" in m][2:]
        tok = data.Tokenizer.from_file(os.path.join(ROOT, a.data, "tokenizer.bpe"))
        prompt = statistics.mean(len(data.prompt_ids(tok, e.prompt, data.TOY_TEMPLATE))
                                 for e in toy.toy_problems(100, "train", seed=0))
        seq = prompt + statistics.mean(m["len_mean"] for m in ms)
        f_rl, _ = flops_per_token(model, (seq + 1) / 2)
        rows.append((f"grpo.py training phase (16 x 8 rows, ~{seq:.0f} tokens each)",
                     statistics.median(m["train_tok_s"] for m in ms), f_rl))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {active / 1e6:.2f}M active "
          "matmul weights per token")
    print(f"{'what':<52} {'tok/s':>8} {'MFLOP/tok':>10} {'GFLOP/s':>8} {'of fp32 peak':>13} {'of bf16 peak':>13}")
    for name, tps, f in rows:
        g = tps * f / 1e9
        print(f"{name:<52} {tps:>8.0f} {f / 1e6:>10.2f} {g:>8.1f} {g / peak[torch.float32]:>13.1%} "
              f"{g / peak[torch.bfloat16]:>13.1%}")


if __name__ == "__main__":
    main()
