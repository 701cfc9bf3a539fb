"""Forward+backward tokens/s of nano-r1's MoE layer against transformers' DeepseekV3MoE holding the same weights.

    python bench/moe.py [--tokens=4096] [--threads=2]

Both layers: DeepSeek-V3 routing (sigmoid scores, correction bias, 8 groups / top-4 groups, top-6 of 64 experts,
1 shared expert), fp32 on CPU. transformers runs with its default experts implementation ("grouped_mm") and with
"eager" (its per-expert loop); the printed ratio is ours / theirs. A dense SwiGLU doing the layer's matmul FLOPs
with no routing at all is timed too: it bounds what any MoE implementation can reach on this CPU (a 2x goal
against a peer already near it cannot be met by software on the same hardware). Run it alone: a second busy
process on 2 cores distorts every number.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from model import MLP, ModelConfig, Transformer  # noqa: E402


def bench(fn, x, iters):
    for _ in range(2):  # warm-up
        fn(x)
    t = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - t) / iters


def fwd_bwd(layer):
    g = None

    def run(x):
        nonlocal g
        x = x.detach().requires_grad_(True)
        y = layer(x)
        if g is None:
            g = torch.randn_like(y)
        (y * g).sum().backward()  # not y.sum(): a stride-0 upstream grad trips grouped_mm's backward (PITFALLS M5)
        layer.zero_grad(set_to_none=True)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    cfg = ModelConfig(vocab_size=256, hidden_size=a.hidden, moe_intermediate_size=a.hidden, num_hidden_layers=2,
                      n_routed_experts=a.experts, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
                      routed_scaling_factor=2.5, first_k_dense_replace=1)
    torch.manual_seed(0)
    ours = Transformer(cfg).layers[1].mlp.train()
    with torch.no_grad():
        ours.gate.e_score_correction_bias.uniform_(0, 0.1)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=a.hidden, intermediate_size=a.hidden, moe_intermediate_size=a.hidden,
        num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
        v_head_dim=16, qk_nope_head_dim=16, n_routed_experts=a.experts, n_shared_experts=1, num_experts_per_tok=6,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=1)
    results = {}
    x = torch.randn(1, a.tokens, a.hidden)
    t_ours = bench(fwd_bwd(ours), x, a.iters)
    # The ceiling: one dense SwiGLU over the same N*(K+1) rows (6 routed + 1 shared expert per token), i.e. the
    # layer's matmul FLOPs with no routing, sorting or scatter. No MoE layer can beat it on this CPU.
    rows = a.tokens * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    dense = MLP(a.hidden, a.hidden).train()
    t_dense = bench(fwd_bwd(dense), torch.randn(1, rows, a.hidden), a.iters)
    flops = 3 * rows * 3 * 2 * a.hidden * a.hidden  # fwd + 2x bwd, 3 projections, 2*D*I each
    for impl in ("grouped_mm", "eager"):
        hf_cfg._experts_implementation = impl
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().model.layers[1].mlp.train()
        with torch.no_grad():  # same weights: HF fuses gate and up as (E, 2I, D)
            hf.gate.weight.copy_(ours.gate.weight)
            hf.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
            hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.gate_proj, ours.experts.up_proj], dim=1))
            hf.experts.down_proj.copy_(ours.experts.down_proj)
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(hf.shared_experts, n).weight.copy_(getattr(ours.shared_experts, n).weight)
            err = (hf(x) - ours(x)).abs().max().item()
        results[impl] = (bench(fwd_bwd(hf), x, a.iters), err)
    print(f"MoE layer fwd+bwd, {a.tokens} tokens, D={a.hidden}, {a.experts} experts top-6, fp32 CPU, "
          f"{a.threads} threads")
    print(f"  dense SwiGLU, same matmul FLOPs {a.tokens / t_dense:9.0f} tok/s   ({flops / t_dense / 1e9:.0f} GFLOP/s: "
          "the ceiling, no routing)")
    print(f"  nano-r1                        {a.tokens / t_ours:10.0f} tok/s   ({flops / t_ours / 1e9:.0f} GFLOP/s, "
          f"{t_dense / t_ours:.0%} of the ceiling)")
    for impl, (t, err) in results.items():
        print(f"  transformers ({impl:10s})    {a.tokens / t:10.0f} tok/s   ({t_dense / t:.0%} of the ceiling)   "
              f"ratio ours/theirs = {t / t_ours:.2f}x   (max |output diff| {err:.1e})")


if __name__ == "__main__":
    main()
