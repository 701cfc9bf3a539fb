"""Fused kernels for the GRPO hot path (analysis below is filled in after testing)."""
from .grpo_loss import GRPOTokenStats, grpo_token_loss
from .logprob import token_logprobs
from .reference import grpo_token_loss_reference, token_logprobs_reference

__all__ = ["token_logprobs", "grpo_token_loss", "GRPOTokenStats", "token_logprobs_reference",
           "grpo_token_loss_reference"]
