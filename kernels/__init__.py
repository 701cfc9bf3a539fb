"""Fused kernels for the GRPO hot path: Triton kernels, each tested against a float64 reference (and the loss
against its definition in plain torch, loss.grpo_loss with its variants off, which is what runs without a GPU).

    token_logprobs(hidden (N, D), weight (V, D), targets (N,), temperature=1.0, backend="auto",
                   return_entropy=False, *, vocab_limit=None, chunk=None, vocab_splits=None)
        -> logp (N,) fp32, or (logp, entropy)                                                  kernels/logprob.py
    grpo_token_loss(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, backend="auto", *,
                    return_stats=False)
        -> per-token loss (N,), or (loss, GRPOTokenStats(clipped_low, clipped_high, kl))       kernels/grpo_loss.py
    token_logprobs_reference, grpo_token_loss_reference: float64 twins (tests, self-checks)    kernels/reference.py
    worst_difference; the kernels' first-use checks on a GPU                                kernels/selfcheck.py

backend: "auto" = Triton on CUDA tensors once the kernel has passed its first-use self-check on that device (against
its float64 twin, forward and backward; kernels/_backend.py), torch otherwise; "torch" = the chunked torch path
anywhere (token_logprobs only; the loss's torch path is loss.grpo_loss); "triton" = the kernels, also on CPU
tensors when TRITON_INTERPRET=1 was set before triton was imported (the tests do this). On a GPU, check the
kernels yourself with: TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py
The package imports without triton; then only the torch path exists.

Sampler/trainer agreement. Temperature divides the logits before the log-softmax, as the sampler does. A padded
LM head (rows past the tokenizer's vocabulary) is excluded with vocab_limit (or by passing weight[:vocab]): the
sampler masks those rows out of its softmax, so they carry no probability there, and the trainer normalising over
them would make every log-prob smaller by log(1 + their share of the mass). Both sides use the same support.

GPU cost on paper (H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 50 MB L2, 132 SMs), at N = 65,536 tokens,
D = 7,168, V = 129,280, bf16 inputs. Not measured: no GPU was available when this was written; the block sizes
(128 x 128 x 64, 8 warps, 3 stages) are untuned first guesses.

  One matmul pass over (N, V, D) is 2 N D V = 121.5 TFLOP = 123 ms at peak. Inputs: h 0.94 GB, W 1.85 GB.
  The naive path's fp32 logits alone are N V 4 B = 33.9 GB, its log-softmax output another 33.9 GB, and the
  backward needs two more (N, V) buffers: it does not fit in 80 GB at this size.

  token_logprobs forward (Triton `_fwd_kernel`): 1 pass = 121.5 TFLOP. Compulsory HBM traffic is ~2.8 GB
  (0.8 ms), so the kernel is compute-bound with a GEMM's data movement: each 128 x 128 output tile reloads its
  h and W slices from L2 every K step, 64 FLOP per byte, ~1.9 TB of L2->SM traffic in all (L2 bandwidth on
  H100 is quoted between ~5.5 and ~12 TB/s, so 128 x 256 tiles or TMA multicast may be needed to stay
  compute-bound). The online log-sum-exp epilogue costs N V = 8.5e9 exps (~2 ms on the SFUs) plus ~10 FLOP per
  logit on the CUDA cores (~1.3 ms): a few % of the matmul. W is re-read from HBM about once per wave of 132
  row blocks (~4 times, ~7 GB). Output: a (4, splits, N) fp32 partial buffer, ~1 MB. Expect what a Triton GEMM
  of the same tiles reaches, 50-65% of peak: ~190-250 ms.
  Backward: per chunk of C rows (default C = 8,305, 8 chunks), `_grad_logits_kernel` recomputes the logits
  (1 pass, same analysis) and writes dL/dz in bf16 (C V 2 B = 2.1 GB buffer; 16.9 GB written over all chunks),
  then cuBLAS does dh = dz W and dW += dz^T h (2 passes, reading dz twice: 34 GB, hidden under the matmuls).
  dW accumulates in fp32 across chunks: per chunk a 1.85 GB bf16 product is written, then read with the 3.7 GB
  fp32 dW, which is written back: ~11 GB per chunk, ~89 GB in all, ~27 ms memory-bound. Total backward: 3 passes
  = 364 TFLOP = 369 ms at peak; expected ~190-250 ms (Triton) + ~330 ms (cuBLAS at ~75%) + ~27 ms.
  Forward + backward: 4 passes = 486 TFLOP = 491 ms at peak; expected ~0.74-0.86 s, i.e. 57-66% of the roofline
  of the work done, or 43-50% measured against the 3 passes (368 ms) that any method storing the logits needs.
  The 4th pass is the price of recomputation; it buys memory: peak extra memory ~2.1 GB (dz) + 3.7 GB (fp32 dW)
  + 1.85 GB (bf16 partial) + 0.94 GB (dh) ~ 8.6 GB, against > 100 GB for the naive path. Against a chunked torch
  path on the same GPU (same 4 passes plus ~10 elementwise passes over fp32 chunk logits, ~340-680 GB of traffic,
  0.1-0.2 s), the fused kernels should save ~15-25% of the time; they exist mainly for memory.
  Determinism: no atomics anywhere; the vocabulary-split merge and the dW accumulation run in a fixed order.
  Correction from a second reading (also on paper), which makes the estimates above optimistic: at this N the
  default vocab_splits is 1, so the forward grid is 512 row blocks x 1 and each program re-reads its 1.84 MB slice
  of h for each of the 1,010 vocabulary tiles; the ~132 resident programs touch ~242 MB of distinct h, far more
  than the 50 MB L2, so ~949 GB come from HBM: >= 283 ms, capping the forward near 43% of peak. Likewise a
  backward chunk's h (8,305 rows, 119 MB) does not fit in L2: re-reading it costs ~481 GB, ~144 ms against 123 ms
  of compute. Untested fixes: grouped program ordering (as in Triton's matmul tutorial) so co-resident programs
  share h tiles, 8-16 vocabulary splits even at large N, and backward chunks of ~1,700 rows (30 MB of h).

  grpo_token_loss (Triton `_fwd_kernel`/`_bwd_kernel`): elementwise, ~24-40 B per token in and out, ~2 MB at
  N = 65,536 (~1 us of HBM time). Both kernels are launch-bound (~5 us each) in place of ~20 small torch kernels;
  a roofline fraction means nothing here. They exist to keep the loss math in one place with its backward, and
  so the clip indicators and k3 come out of the same pass.

CPU: bench/logprob.py measures the torch path against the naive one (memory and time); the figures are in
README.md, "Measured speed".
"""
from ._backend import use_triton
from .grpo_loss import K3_MAX, GRPOTokenStats, grpo_token_loss
from .logprob import token_logprobs
from .reference import grpo_token_loss_reference, token_logprobs_reference
from .selfcheck import worst_difference  # importing it registers the kernels' first-use checks

__all__ = ["token_logprobs", "grpo_token_loss", "GRPOTokenStats", "K3_MAX", "use_triton", "token_logprobs_reference",
           "grpo_token_loss_reference", "worst_difference"]
