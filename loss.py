"""The GRPO objective (paper Eq. 1-3), the math grpo.py's loop runs: group advantages, the per-token clipped
surrogate with the k3 KL term, and the weights that aggregate tokens into one optimizer step's loss.

grpo_loss is the definition, in plain torch (kernels.grpo_token_loss fuses the same math into one Triton kernel
each way for GPUs and is tested against it; tests/ hold a float64 reference). Edit here to try a sequence-level
ratio or another KL estimator.
"""
import warnings

import torch

import dist
import kernels


def group_advantages(rewards, scale="group", eps=1e-6, tol=1e-6, batch_std=None):
    """rewards (num_prompts, G) -> advantages (num_prompts, G).
    group: (r - group mean) / (group std + eps), std unbiased (ddof=1); batch: the std over all rewards (or
    batch_std, when the caller computed it over every rank); none: r - group mean (Dr. GRPO). A group whose rewards
    span <= tol (max - min, robust to fp32 residue such as 0.1 + 0.2) gets exactly 0, never NaN or a blown-up 1/eps
    (PITFALLS P6)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"group_advantages: want (num_prompts, G >= 2) rewards, got shape {tuple(r.shape)}")
    centered = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = centered / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = centered / ((r.std() if batch_std is None else batch_std) + eps)
    elif scale == "none":
        adv = centered
    else:
        raise ValueError(f"group_advantages: scale {scale!r} is not group, batch or none")
    constant = (r.max(1, keepdim=True).values - r.min(1, keepdim=True).values) <= tol
    return torch.where(constant, torch.zeros_like(adv), adv).float()


def overlong_penalty(length, max_len, buffer):
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to -1 at max_len."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    return max(-1.0, (max_len - buffer - length) / buffer)


def token_weights(b, c):
    """(B,) float64: the loss weight of each output's tokens in one optimizer step, so the step's loss is
    sum(w * loss_tok) whatever the split into micro-batches or ranks (PITFALLS P8). Outputs out of the loss get
    weight 0 and leave the normaliser."""
    L = b.comp_len.double()
    n_seq = max(dist.all_reduce_sum(float(b.keep.sum())), 1.0)
    n_tok = max(dist.all_reduce_sum(float(L[b.keep].sum())), 1.0)
    w = {"seq_mean_token_mean": 1.0 / (L * n_seq), "token_mean": torch.full_like(L, 1.0 / n_tok),
         "dr_grpo": torch.full_like(L, 1.0 / (n_seq * c.max_new_tokens))}[c.loss_agg]  # dr_grpo: fixed per step
    return torch.where(b.keep, w, 0.0)


K3_MAX = kernels.K3_MAX  # per-token cap on the k3 KL estimate (kernels/grpo_loss.py says why: 10, as verl)


def grpo_loss(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, beta):
    """Per-token GRPO loss (Eq. 1-2 at token level) and its diagnostics; all (N,) over completion tokens.
    ratio = exp(logp - old), old_logp None: on-policy (old = logp detached, ratio 1, gradient -A). KL: Schulman's
    k3 = exp(d) - d - 1, d = ref - logp, capped at K3_MAX with no gradient where the cap binds. mask: bool, or a
    float weight; masked tokens give exactly 0 (inputs are selected, not multiplied, so padding garbage never
    reaches the gradient through 0 * inf)."""
    keep, zero = mask != 0, torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp, a = torch.where(keep, logp, zero), torch.where(keep, adv, zero)
    ratio = torch.exp(lp - (lp.detach() if old_logp is None else torch.where(keep, old_logp, zero)))
    loss = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    kl, capped = torch.zeros_like(lp), torch.zeros_like(lp, dtype=torch.bool)
    if ref_logp is not None:
        d = torch.where(keep, ref_logp, zero) - lp
        k3 = torch.exp(d.clamp(max=30.0)) - d - 1  # the clamp keeps exp finite; the cap binds long before
        capped = keep & (k3 > K3_MAX)
        kl = torch.where(capped, torch.full_like(k3, K3_MAX), k3)
        if beta != 0:
            loss = loss + beta * kl
    loss = torch.where(keep, loss * mask, zero)
    r = ratio.detach()
    return loss, kernels.GRPOTokenStats(
        (keep & (a < 0) & (r < 1 - eps_low)).to(logp.dtype), (keep & (a > 0) & (r > 1 + eps_high)).to(logp.dtype),
        torch.where(keep, kl.detach(), zero), capped.to(logp.dtype))


_fused_ok = {}  # device -> the fused kernel matched grpo_loss on the first real micro-batch there


def grpo_loss_auto(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, beta):
    """grpo_loss, or on a CUDA device with Triton its fused twin kernels.grpo_token_loss. The first fused call on a
    device also runs grpo_loss on the same micro-batch and compares loss and d loss / d logp (relative 1e-5); if
    they differ, or the kernel fails, it warns and uses grpo_loss on that device from then on."""
    args = (old_logp, ref_logp, adv, mask, eps_low, eps_high, beta)
    if not (logp.numel() and kernels.use_triton("auto", logp, where="kernels.grpo_token_loss")):
        return grpo_loss(logp, *args)
    key = str(logp.device)
    if key not in _fused_ok:
        x = logp.detach().float().requires_grad_()
        try:
            (a, _), (b, _) = kernels.grpo_token_loss(x, *args, "triton", return_stats=True), grpo_loss(x, *args)
            ga, gb = (torch.autograd.grad(y.sum(), x)[0] for y in (a, b))
            why = kernels.worst_difference(("loss", "d/dlogp"), (a, ga), (b, gb), 1e-5)
        except Exception as e:  # noqa: BLE001 - any failure means: use the definition
            why = f"{type(e).__name__}: {e}"
        if why:
            warnings.warn(f"kernels.grpo_token_loss disagrees with loss.grpo_loss on a training micro-batch on "
                          f"{key} ({why}); using loss.grpo_loss there", RuntimeWarning, stacklevel=2)
        _fused_ok[key] = not why
    if not _fused_ok[key]:
        return grpo_loss(logp, *args)
    return kernels.grpo_token_loss(logp, *args, "triton", return_stats=True)
