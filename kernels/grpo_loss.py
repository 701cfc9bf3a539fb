"""The GRPO per-token loss (paper Eq. 1-2 at token level; defined in plain torch as loss.grpo_loss), forward and
backward fused into one Triton kernel each.

    ratio   = exp(logp - old_logp)                 old_logp None: on-policy, old = logp.detach() (ratio 1, grad -A)
    surr    = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    k3      = min(exp(d) - d - 1, K3_MAX)          d = ref - logp; Schulman's estimator of KL(pi || ref): >= 0,
                                                   0 at logp == ref; bounded (below)
    loss    = mask * (-surr + beta * k3)           k3 only when ref_logp is given and beta != 0
    d loss / d logp = mask * (-A * ratio * [not clipped] + beta * (1 - exp(d)) * [k3 not bounded])

The bound. k3 grows like exp(ref - logp): a rare sampled token (policy 1e-6, reference 0.5) has k3 ~ 5e5, which
swamps every surrogate term of the batch, and ref - logp > 88 overflows fp32 to inf (a skipped step). So k3 is
capped at K3_MAX = 10 per token (verl caps its k3 at 10 too): where the cap binds (ref - logp > ~2.6, or < -11)
the token's KL term is the constant 10 and gives no gradient, as a clipped ratio does. exp() sees d clamped to
<= 30 so nothing overflows on the way. The stats count the tokens where the cap binds ("kl_capped").

A token is clipped (zero surrogate gradient) when A > 0 and ratio > 1 + eps_high ("clipped_high") or A < 0 and
ratio < 1 - eps_low ("clipped_low"); exactly where torch's min/clamp give zero gradient (PITFALLS P10). With
return_stats the same kernel also writes those indicators and k3 per token, so the trainer logs clip fractions
and KL without recomputing anything. Masked tokens (mask == 0) give exactly 0 loss, gradient and statistics even
when their inputs are inf/NaN garbage (padding, PITFALLS P3): the kernel selects instead of multiplying. A float
mask acts as a per-token weight on the loss. The reduction over tokens stays with the caller (grpo.py), so its
normaliser can span micro-batches and ranks. Elementwise: on a GPU this is launch-bound (see kernels/__init__.py).
"""
import dataclasses
import math

import torch

from ._backend import jit, tl, triton, use_triton

K3_MAX = 10.0  # per-token cap on the k3 KL estimate (see the module docstring)


@dataclasses.dataclass
class GRPOTokenStats:
    """Per-token diagnostics, fp32, 0 on masked tokens: sum them with the mask's token count for fractions/means."""
    clipped_low: torch.Tensor  # 1.0 where A < 0 and ratio < 1 - eps_low
    clipped_high: torch.Tensor  # 1.0 where A > 0 and ratio > 1 + eps_high
    kl: torch.Tensor  # k3 per token, capped at K3_MAX (0 everywhere when ref_logp is None; also when beta == 0)
    kl_capped: torch.Tensor  # 1.0 where the K3_MAX cap binds


K3_MAX_C = tl.constexpr(K3_MAX) if triton is not None else K3_MAX  # a compile-time constant in the kernels


@jit
def _terms(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, offs, N, eps_low, eps_high,
           HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr):
    """Shared by forward and backward: sanitised inputs, ratio, clip indicators, ref - logp."""
    ok = offs < N
    mk = tl.load(mask_ptr + offs, mask=ok, other=0.0)
    keep = mk != 0
    lp = tl.where(keep, tl.load(logp_ptr + offs, mask=ok, other=0.0), 0.0)
    a = tl.where(keep, tl.load(adv_ptr + offs, mask=ok, other=0.0), 0.0)
    ratio = tl.full(lp.shape, 1.0, tl.float32)
    if HAS_OLD:
        ratio = tl.exp(lp - tl.where(keep, tl.load(old_ptr + offs, mask=ok, other=0.0), 0.0))
    clip_lo = keep & (a < 0) & (ratio < 1 - eps_low)
    clip_hi = keep & (a > 0) & (ratio > 1 + eps_high)
    d = tl.zeros(lp.shape, tl.float32)
    if HAS_REF:
        d = tl.where(keep, tl.load(ref_ptr + offs, mask=ok, other=0.0), 0.0) - lp
    ed = tl.exp(tl.minimum(d, 30.0))
    k3 = ed - d - 1  # 0 when HAS_REF is off (d == 0)
    capped = keep & (k3 > K3_MAX_C)
    return ok, mk, keep, a, ratio, clip_lo, clip_hi, ed, tl.where(capped, K3_MAX_C, k3), capped


@jit
def _fwd_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, loss_ptr, lo_ptr, hi_ptr, kl_ptr, cap_ptr, N,
                eps_low, eps_high, beta, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr,
                STATS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok, mk, keep, a, ratio, clip_lo, clip_hi, ed, kl, capped = _terms(
        logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, offs, N, eps_low, eps_high, HAS_OLD, HAS_REF)
    clipped = tl.minimum(tl.maximum(ratio, 1 - eps_low), 1 + eps_high)
    loss = -tl.minimum(ratio * a, clipped * a)
    if ADD_KL:
        loss += beta * kl
    tl.store(loss_ptr + offs, tl.where(keep, loss * mk, 0.0), mask=ok)
    if STATS:
        tl.store(lo_ptr + offs, clip_lo.to(tl.float32), mask=ok)
        tl.store(hi_ptr + offs, clip_hi.to(tl.float32), mask=ok)
        tl.store(kl_ptr + offs, tl.where(keep, kl, 0.0), mask=ok)
        tl.store(cap_ptr + offs, capped.to(tl.float32), mask=ok)


@jit
def _bwd_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, gout_ptr, glogp_ptr, N, eps_low, eps_high, beta,
                HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok, mk, keep, a, ratio, clip_lo, clip_hi, ed, kl, capped = _terms(
        logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, offs, N, eps_low, eps_high, HAS_OLD, HAS_REF)
    g = tl.where(clip_lo | clip_hi, 0.0, -a * ratio)  # d ratio / d logp = ratio
    if ADD_KL:
        g += tl.where(capped, 0.0, beta * (1 - ed))
    g_out = tl.load(gout_ptr + offs, mask=ok, other=0.0)
    tl.store(glogp_ptr + offs, tl.where(keep, g * mk * g_out, 0.0), mask=ok)


def _grid(N, x):
    block = 1024 if x.is_cuda else 64  # 64 keeps the interpreter tests multi-block at small N
    return (triton.cdiv(N, block),), block


class GRPOTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, eps_low, eps_high, beta, stats):
        N, has_old, has_ref = logp.numel(), old is not None, ref is not None
        add_kl = has_ref and beta != 0
        grid, block = _grid(N, logp)
        loss = torch.empty_like(logp)
        out = [torch.empty_like(logp) for _ in range(4)] if stats else [loss] * 4  # never written without STATS
        _fwd_kernel[grid](logp, old if has_old else logp, ref if has_ref else logp, adv, mask, loss, *out, N,
                          eps_low, eps_high, beta, has_old, has_ref, add_kl, stats, BLOCK=block)
        ctx.save_for_backward(logp, old, ref, adv, mask)
        ctx.opts = (eps_low, eps_high, beta, has_old, has_ref, add_kl)
        if not stats:
            return (loss,)
        ctx.mark_non_differentiable(*out)
        return (loss, *out)

    @staticmethod
    def backward(ctx, g_loss, *_):
        logp, old, ref, adv, mask = ctx.saved_tensors
        eps_low, eps_high, beta, has_old, has_ref, add_kl = ctx.opts
        N = logp.numel()
        g_logp = torch.empty_like(logp)
        grid, block = _grid(N, logp)
        _bwd_kernel[grid](logp, old if has_old else logp, ref if has_ref else logp, adv, mask, g_loss.contiguous(),
                          g_logp, N, eps_low, eps_high, beta, has_old, has_ref, add_kl, BLOCK=block)
        return g_logp, None, None, None, None, None, None, None, None


def grpo_token_loss(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, backend="auto", *,
                    return_stats=False):
    """The fused GRPO per-token loss: loss.grpo_loss (the definition, plain torch) with its variants off (the
    default loss only: GSPO, TIS/MIS, k1/k2 and the entropy bonus run the definition) in one Triton kernel each way.
    Shaped like logp, fp32; with return_stats, (loss, GRPOTokenStats). Only logp is differentiated: old_logp,
    ref_logp, advantages and mask are constants (detached). advantages are per token (the caller broadcasts sequence
    advantages); mask is bool or float (a float mask weights the loss). old_logp=None: on-policy; ref_logp=None or
    beta=0: no KL term."""
    where = "kernels.grpo_token_loss"
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("advantages", advantages), ("mask", mask)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{where}: {name} has shape {tuple(x.shape)}, logp has {tuple(logp.shape)}")
    if not logp.is_floating_point():
        raise ValueError(f"{where}: logp must be a float tensor, got {logp.dtype}")
    for name, v in (("eps_low", eps_low), ("eps_high", eps_high), ("beta", beta)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{where}: {name}={v!r} must be a finite number >= 0")
    # eps_low >= 1 is allowed: the lower bound 1 - eps_low <= 0 never binds (the paper's epsilon = 10 does that)
    if backend == "torch" or not use_triton(backend, logp, where=where):
        raise RuntimeError(f"{where}: the fused kernel needs Triton and CUDA tensors (or TRITON_INTERPRET=1); "
                           "loss.grpo_loss is the same loss in plain torch")
    prep = lambda x: None if x is None else x.detach().reshape(-1).float().contiguous()  # noqa: E731
    old, ref, adv, mk = prep(old_logp), prep(ref_logp), prep(advantages), prep(mask)
    out = GRPOTokenLoss.apply(logp.reshape(-1).float().contiguous(), old, ref, adv, mk, float(eps_low),
                              float(eps_high), float(beta), return_stats)
    loss, stats = out[0], out[1:]
    loss = loss.reshape(logp.shape)
    if not return_stats:
        return loss
    return loss, GRPOTokenStats(*(s.reshape(logp.shape) for s in stats))
