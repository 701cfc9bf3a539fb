"""The GRPO objective (paper Eq. 1-3), the math grpo.py's loop runs: group advantages, the per-token clipped
surrogate with the k3 KL term, and the weights that aggregate tokens into one optimizer step's loss.

grpo_loss is the definition, in plain torch (kernels.grpo_token_loss fuses the default math into one Triton kernel
each way for GPUs and is tested against it; tests/ hold a float64 reference). Its variants, each a keyword that is
off by default and a flag in grpo.py: a sequence-level ratio (GSPO), per-token weights that correct for the
sampler/trainer mismatch (sampler_correction: TIS, MIS), the k1/k2 KL estimators, an entropy bonus.
"""
import math
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


def advantages(shaped, unjudged, c):
    """Shaped rewards (num_prompts, G) -> group advantages, 0 for the unjudged (num_prompts,) groups. A collective
    with --adv-scale=batch (the std over every rank's rewards, unbiased): every rank calls it, even with none."""
    batch_std = None
    if c.adv_scale == "batch":
        n, s1, s2 = (dist.all_reduce_sum(float(v)) for v in (shaped.numel(), shaped.sum(), shaped.pow(2).sum()))
        batch_std = math.sqrt(max(s2 - s1 * s1 / max(n, 1), 0.0) / max(n - 1, 1))
    if not len(shaped):
        return shaped
    adv = group_advantages(shaped, c.adv_scale, c.adv_eps, batch_std=batch_std)
    adv[unjudged] = 0.0
    return adv


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


def live_rows(b, c):
    """The rows of mini-batch b that grpo.train_step runs -> index tensors of at most micro_batch_size rows, one per
    micro-batch: all rows, or with --skip-zero-adv the kept ones with a non-zero advantage. With no KL term, entropy
    bonus or balance loss (grpo.check_config and main refuse them), an output with advantage 0 adds 0 * ratio to the
    loss, an exact 0 gradient, so its forward and backward are pure cost (70-95% of the groups of the R1 stages).
    Under FSDP every rank must run as many forwards: a rank short of micro-batches pads with skipped rows (still 0)."""
    B, n = len(b.adv), c.micro_batch_size
    if not c.skip_zero_adv:
        return length_chunks(b, torch.arange(B), n)
    run = b.keep & (b.adv != 0)  # (B,)
    chunks = length_chunks(b, run.nonzero().flatten(), n)
    spare = (~run).nonzero().flatten()  # (B - B',) the fillers, at least as many as missing
    missing = int(dist.all_reduce_max(len(chunks))) - len(chunks)
    return chunks + [spare[i:i + 1] for i in range(missing)]


def length_chunks(b, rows, n):
    """rows (R,) of b -> micro-batches of at most n of them, cut from the rows ordered by length (prompt + completion):
    a micro-batch is padded to its longest row, so n outputs taken in rollout order from a wide spread of lengths
    (R1's outputs: hundreds to 32k tokens) pad nearly every row to near the longest. ceil(R / n) of them, as in rollout
    order (FSDP ranks agree on the count); each lists its rows in index order, so a single one is `rows` as given."""
    if len(rows) <= n:
        return [rows] if len(rows) else []
    order = rows[torch.argsort((b.prompt_len + b.comp_len)[rows], stable=True)]  # (R,) shortest first
    return [chunk.sort().values for chunk in order.split(n)]


K3_MAX = kernels.K3_MAX  # per-token cap on the k3 KL estimate (kernels/grpo_loss.py says why: 10, as verl)


def kl_estimate(d, estimator="k3"):
    """Per-token estimate of KL(pi || ref) on tokens sampled from pi, from d = ref_logp - logp (N,) -> (kl, capped).
    Schulman's estimators of the value: k1 = -d (unbiased, often negative), k2 = d^2 / 2 (biased, >= 0),
    k3 = exp(d) - d - 1 (unbiased, >= 0). As a loss term, differentiated through logp, their expected gradients per
    token differ: k1's is 0 (it belongs in the reward: --kl-in-reward), k2's is that of KL(pi || ref), k3's that of
    KL(ref || pi). k3 is capped at K3_MAX with no gradient where the cap binds (capped: those tokens)."""
    if estimator == "k1":
        return -d, torch.zeros_like(d, dtype=torch.bool)
    if estimator == "k2":
        return 0.5 * d * d, torch.zeros_like(d, dtype=torch.bool)
    k3 = torch.exp(d.clamp(max=30.0)) - d - 1  # the clamp keeps exp finite; the cap binds long before
    capped = k3 > K3_MAX
    return torch.where(capped, torch.full_like(k3, K3_MAX), k3), capped


def sequence_sum(x, rows):
    """x (N,) per token -> (N,): on each token, the sum of x over its sequence's tokens. rows (N,): each token's row
    in the micro-batch (train_step splits by rows, so a sequence never straddles micro-batches). index_add_ on CUDA
    adds with atomics: the last bits of a sum can differ from run to run there (PITFALLS M5)."""
    n = int(rows.max()) + 1 if rows.numel() else 0
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, rows, x)[rows]


def sampler_correction(train_logp, sampler_logp, keep, rows, c):
    """Weights for the rollout/training mismatch: the sampler (other kernels, bf16, other experts) and the trainer
    at the same parameters give the sampled tokens different log-probs, so the rollout is slightly off-policy.
    rho = pi_train / pi_sampler per token, pi_train the trainer at the old parameters. -> (weight (N,) detached,
    dropped (N,) bool), the weight multiplying each token's surrogate (not its KL term):
    TIS (c.tis_cap = C > 0): min(rho, C). MIS (c.mis_high > 0): 0 where rho leaves [c.mis_low, c.mis_high];
    c.mis_level="sequence" tests a sequence's ratio, the product of its tokens' rho, and drops all its tokens.
    Dropped tokens stay in the normaliser (token_weights), as clipped tokens do."""
    zero = torch.zeros((), dtype=train_logp.dtype, device=train_logp.device)
    log_rho = torch.where(keep, train_logp - sampler_logp, zero).detach()  # (N,)
    w = torch.exp(log_rho).clamp(max=c.tis_cap) if c.tis_cap else torch.ones_like(log_rho)
    dropped = torch.zeros_like(keep)
    if c.mis_high:
        rho = torch.exp(sequence_sum(log_rho, rows) if c.mis_level == "sequence" else log_rho)  # inf, 0: outside
        dropped = keep & ((rho < c.mis_low) | (rho > c.mis_high))
        w = torch.where(dropped, zero, w)
    return torch.where(keep, w, zero), dropped


def grpo_loss(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, beta, *, rows=None, ratio_level="token",
              is_weight=None, kl_estimator="k3", entropy=None, entropy_coef=0.0):
    """Per-token GRPO loss (Eq. 1-2 at token level) and its diagnostics; all (N,) over completion tokens.
    ratio = exp(logp - old), old_logp None: on-policy (old = logp detached, ratio 1, gradient -A). KL: Schulman's
    k3 = exp(d) - d - 1, d = ref - logp, capped at K3_MAX with no gradient where the cap binds. mask: bool, or a
    float weight; masked tokens give exactly 0 (inputs are selected, not multiplied, so padding garbage never
    reaches the gradient through 0 * inf).
    Variants (the defaults are the loss above): ratio_level="sequence" (GSPO, needs rows: each token's row in the
    micro-batch); is_weight (N,) detached weights on the surrogate (sampler_correction); kl_estimator k1, k2
    (kl_estimate); entropy (N,) with entropy_coef: the loss minus entropy_coef * entropy (a bonus)."""
    keep, zero = mask != 0, torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp, a = torch.where(keep, logp, zero), torch.where(keep, adv, zero)
    log_ratio = lp - (lp.detach() if old_logp is None else torch.where(keep, old_logp, zero))
    if ratio_level == "sequence":
        # GSPO: one ratio per output, s_i = exp(mean over its tokens of log_ratio), clipped as a whole. Each token
        # carries s_i's value with the gradient s_i d logp_t (sg[s_i] * exp(logp - sg[logp])), so token_weights
        # aggregate it; with seq_mean_token_mean, sum_t s_i / |o_i| d logp_t = d s_i: GSPO exactly.
        n_tok = sequence_sum(keep.to(lp.dtype), rows).clamp(min=1)
        s = torch.exp(sequence_sum(log_ratio.detach(), rows) / n_tok)  # (N,) s_i on each token of output i
        ratio = s * torch.exp(lp - lp.detach())
    else:
        ratio = torch.exp(log_ratio)
    loss = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)  # the clip acts on s_i for GSPO
    if is_weight is not None:
        loss = loss * torch.where(keep, is_weight, zero)
    if entropy_coef != 0:
        loss = loss - entropy_coef * torch.where(keep, entropy, zero)
    kl, capped = torch.zeros_like(lp), torch.zeros_like(lp, dtype=torch.bool)
    if ref_logp is not None:
        kl, capped = kl_estimate(torch.where(keep, ref_logp, zero) - lp, kl_estimator)
        capped = keep & capped
        if beta != 0:
            loss = loss + beta * kl
    loss = torch.where(keep, loss * mask, zero)
    r = ratio.detach()
    return loss, kernels.GRPOTokenStats(
        (keep & (a < 0) & (r < 1 - eps_low)).to(logp.dtype), (keep & (a > 0) & (r > 1 + eps_high)).to(logp.dtype),
        torch.where(keep, kl.detach(), zero), capped.to(logp.dtype))


_fused_ok = {}  # device -> the fused kernel matched grpo_loss on the first real micro-batch there


def grpo_loss_auto(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, beta, **variants):
    """grpo_loss, or on a CUDA device with Triton its fused twin kernels.grpo_token_loss. The first fused call on a
    device also runs grpo_loss on the same micro-batch and compares loss and d loss / d logp (relative 1e-5); if
    they differ, or the kernel fails, it warns and uses grpo_loss on that device from then on. variants: grpo_loss's
    keywords."""
    args = (old_logp, ref_logp, adv, mask, eps_low, eps_high, beta)
    # the fused kernel implements only the default loss: with any variant on, the definition runs
    default = (variants.get("ratio_level", "token") == "token" and variants.get("is_weight") is None
               and variants.get("kl_estimator", "k3") == "k3" and not variants.get("entropy_coef", 0.0))
    if not (default and logp.numel() and kernels.use_triton("auto", logp, where="kernels.grpo_token_loss")):
        return grpo_loss(logp, *args, **variants)
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
