"""The GRPO per-token loss (paper Eq. 1-2, token level): clipped surrogate with separate low/high epsilon plus
beta times the k3 KL estimator, masked. The reduction over tokens (sequence-mean, token-mean, Dr. GRPO) is the
caller's (grpo.py), so the normaliser can span micro-batches and ranks.

  ratio = exp(logp - old_logp)               (old_logp None: on-policy, ratio == 1 with gradient d logp)
  surrogate = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
  k3 = exp(ref - logp) - (ref - logp) - 1    (>= 0, 0 when logp == ref; Schulman's unbiased estimator)
  loss = (-surrogate + beta * k3) * mask
"""
import torch


def grpo_token_loss_torch(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta):
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    loss = -surrogate
    if ref_logp is not None and beta != 0:
        d = ref_logp - logp
        loss = loss + beta * (torch.exp(d) - d - 1)
    return loss * mask.to(loss.dtype)


def grpo_token_loss_reference(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta):
    """float64 twin for tests (same formula, written out with where instead of min/clamp)."""
    lp = logp.double()
    ratio = torch.exp(lp - (lp.detach() if old_logp is None else old_logp.double()))
    A = advantages.double()
    clipped = torch.where(ratio < 1 - eps_low, torch.full_like(ratio, 1 - eps_low),
                          torch.where(ratio > 1 + eps_high, torch.full_like(ratio, 1 + eps_high), ratio))
    s1, s2 = ratio * A, clipped * A
    loss = -torch.where(s1 < s2, s1, s2)
    if ref_logp is not None and beta != 0:
        d = ref_logp.double() - lp
        loss = loss + beta * (torch.exp(d) - d - 1)
    return loss * mask.double()
