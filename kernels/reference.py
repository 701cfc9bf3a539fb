"""Naive float64 twins of the kernels, for the tests and the kernels' first-use self-checks on a GPU: every logit
at once, plain autograd, no chunking."""
import torch


def token_logprobs_reference(hidden, weight, targets, temperature=1.0, vocab_limit=None):
    """(logp, entropy), each (N,) float64, from the full (N, V) float64 log-softmax."""
    w = weight if vocab_limit is None else weight[:vocab_limit]
    z = (hidden.double() @ w.double().T) / temperature  # (N, V)
    lq = torch.log_softmax(z, -1)
    return lq.gather(1, targets[:, None]).squeeze(1), -(lq.exp() * lq).sum(-1)


def grpo_token_loss_reference(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, k3_max=10.0):
    """(loss, clipped_low, clipped_high, kl, kl_capped), float64, written with where instead of min/clamp; k3
    capped at k3_max per token (no gradient where it binds). Masked tokens contribute exactly 0 whatever their
    (possibly non-finite) inputs."""
    keep = mask != 0
    safe = lambda x: torch.where(keep, x.double(), torch.zeros((), dtype=torch.float64))  # noqa: E731
    lp = safe(logp)
    ratio = torch.exp(lp - (lp.detach() if old_logp is None else safe(old_logp)))
    A = safe(advantages)
    lo, hi = 1 - eps_low, 1 + eps_high
    clipped = torch.where(ratio < lo, torch.full_like(ratio, lo), torch.where(ratio > hi, torch.full_like(ratio, hi),
                                                                               ratio))
    s1, s2 = ratio * A, clipped * A
    loss = -torch.where(s1 < s2, s1, s2)
    kl, capped = torch.zeros_like(lp), torch.zeros_like(lp, dtype=torch.bool)
    if ref_logp is not None:
        d = safe(ref_logp) - lp
        raw = torch.exp(torch.where(d > 30, torch.full_like(d, 30.0), d)) - d - 1
        capped = (raw > k3_max) & keep
        kl = torch.where(capped, torch.full_like(raw, k3_max), raw)
        if beta != 0:
            loss = loss + beta * kl
    m = safe(mask.to(torch.float64))
    clip_low = ((A < 0) & (ratio < lo) & keep).double()
    clip_high = ((A > 0) & (ratio > hi) & keep).double()
    return loss * m, clip_low, clip_high, kl.detach() * keep, capped.double()
