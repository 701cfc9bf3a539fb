"""Fused kernels for the GRPO hot path, each with a chunked torch twin and a float64 reference.

backend: "torch" (chunked pure torch, runs anywhere), "auto" (the default; torch until the Triton kernels land).
"""
from .grpo_loss import grpo_token_loss_reference, grpo_token_loss_torch
from .logprob import token_logprobs_reference, token_logprobs_torch

BACKENDS = ("auto", "torch")


def _check(backend):
    if backend not in BACKENDS:
        raise ValueError(f"kernels: backend {backend!r} is not one of {BACKENDS}")


def token_logprobs(hidden, weight, targets, temperature=1.0, backend="auto", return_entropy=False, chunk=1024):
    """hidden (N, D), weight (V, D), targets (N,) -> log p(target) (N,) fp32 [, entropy (N,) fp32]."""
    _check(backend)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or \
            targets.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs: want hidden (N, D), weight (V, D), targets (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    return token_logprobs_torch(hidden, weight, targets, temperature, return_entropy, chunk)


def grpo_token_loss(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, backend="auto"):
    """Per-token GRPO loss (N,); see kernels/grpo_loss.py."""
    _check(backend)
    return grpo_token_loss_torch(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta)
