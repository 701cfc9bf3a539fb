"""First-use checks of the Triton kernels on a GPU (kernels/_backend.py runs them once per device before
backend="auto" trusts a kernel): each kernel against its float64 twin (kernels/reference.py) on a small random
input, forward and backward, fp32. Each returns None, or which output differs and by how much."""
import torch

from ._backend import SELF_CHECKS
from .grpo_loss import K3_MAX, grpo_token_loss
from .logprob import token_logprobs
from .reference import grpo_token_loss_reference, token_logprobs_reference


def worst_difference(names, got, want, tol):
    """None if every got[i] is within tol of want[i], relative to 1 + max |want[i]|; else the worst one, named."""
    errs = {k: float((a.detach().double() - b.detach().double()).abs().max()) /
            (1 + float(b.detach().double().abs().max())) for k, a, b in zip(names, got, want)}
    worst = max(errs, key=errs.get)
    return None if errs[worst] <= tol else f"{worst} off by {errs[worst]:.2e} (relative to 1 + max |reference|)"


def token_logprobs_check(device, N=300, D=96, V=1000, tol=2e-5):
    """Log-probs, entropy, d/dh and d/dW of a random mix of both; a padded head (vocab_limit); several row blocks,
    vocabulary tiles and backward chunks, the last of each partial."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(device).requires_grad_()
    w = (torch.randn(V + 5, D, generator=g) * 0.3).to(device).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(device)
    mix = torch.randn(2, N, generator=g, dtype=torch.float64).to(device)
    got = token_logprobs(h, w, t, 0.7, "triton", True, vocab_limit=V, chunk=N // 3 + 1)  # 3 backward chunks
    want = token_logprobs_reference(h, w, t, 0.7, vocab_limit=V)
    got, want = [(lp, ent, *torch.autograd.grad((lp.double() * mix[0] + ent.double() * mix[1]).sum(), (h, w)))
                 for lp, ent in (got, want)]
    return worst_difference(("logp", "entropy", "d/dh", "d/dW"), got, want, tol)


def grpo_token_loss_check(device, N=2500, tol=1e-5):
    """Loss, d/dlogp, clip indicators, k3 and its cap; ratios far outside the clip range on both sides; masked
    tokens holding inf/NaN garbage; several blocks, the last partial."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(N, generator=g) * 3
    old, ref = logp + torch.randn(N, generator=g) * 0.5, logp + torch.randn(N, generator=g) * 3
    adv, mask = torch.randn(N, generator=g), torch.rand(N, generator=g) > 0.2
    logp[~mask], old[~mask], ref[~mask], adv[~mask] = 1e4, float("nan"), float("inf"), float("-inf")
    logp, old, ref, adv, mask = (x.to(device) for x in (logp, old, ref, adv, mask))
    logp.requires_grad_()
    mix = torch.randn(N, generator=g, dtype=torch.float64).to(device)
    loss, st = grpo_token_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.04, "triton", return_stats=True)
    want = grpo_token_loss_reference(logp, old, ref, adv, mask, 0.2, 0.28, 0.04, K3_MAX)
    grads = [torch.autograd.grad((x.double() * mix).sum(), logp)[0] for x in (loss, want[0])]
    return worst_difference(("loss", "d/dlogp", "clipped_low", "clipped_high", "k3", "k3 capped"),
                            (loss, grads[0], st.clipped_low, st.clipped_high, st.kl, st.kl_capped),
                            (want[0], grads[1], *want[1:]), tol)


SELF_CHECKS.update({"kernels.token_logprobs": token_logprobs_check,
                    "kernels.grpo_token_loss": grpo_token_loss_check})
