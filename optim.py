"""The optimizer step sft.py and grpo.py share: AdamW with decay on matrices only, the learning-rate schedule, a
guarded step that skips a non-finite update on every rank at once, and DeepSeek-V3's aux-loss-free expert balancing
(the router bias nudged between steps, outside the loss).
"""
import math

import numpy as np
import torch

from config import ConfigError
from dist import all_reduce_max, distributed, print0


def lr_at(step, lr, warmup_steps, max_steps, schedule="cosine", min_lr_frac=0.1):
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to min_lr_frac * lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ConfigError(f"--lr-schedule={schedule!r}: one of constant, cosine")
    t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + np.cos(np.pi * t)))


def set_lr(opt, step, c):
    """The schedule's learning rate at `step` (c: the lr, warmup_steps, max_steps, lr_schedule and min_lr_frac
    settings sft.py and grpo.py share), set on every parameter group -> lr."""
    lr = lr_at(step, c.lr, c.warmup_steps, c.max_steps, c.lr_schedule, c.min_lr_frac)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def adamw(model, lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8):
    """AdamW with weight decay on matrices (and stacked experts) only, not on norms, biases or 1-D tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)


def optimizer_step(model, opt, loss_sum, grad_clip):
    """Clip, then step unless the loss sum or the gradient norm is non-finite (a skipped step leaves the weights and
    the optimizer state untouched); gradients are cleared either way. -> (grad norm before clipping, stepped)."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # a DTensor under FSDP
    ok = math.isfinite(loss_sum) and bool(torch.isfinite(gnorm))
    ok = all_reduce_max(0.0 if ok else 1.0) == 0.0  # every rank skips or none does (a local non-finite loss counts)
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm.item(), ok


def count_bad_steps(ok, bad, step, max_bad, check):
    """bad: non-finite steps in a row before `step`. A skipped update is said; max_bad of them in a row stop the run
    (check: what to look at besides --lr). -> the new count"""
    if ok:
        return 0
    bad += 1
    print0(f"step {step}: non-finite loss or grad norm, update skipped ({bad} in a row)")
    if bad >= max_bad:
        raise RuntimeError(f"{bad} non-finite steps in a row: lower --lr or check {check}")
    return bad


# ----------------------------------------------------------------------------------------------------------------
# aux-loss-free balancing (DeepSeek-V3): after each optimizer step, not through the loss


@torch.no_grad()
def pop_expert_loads(model):
    """(n_moe_layers, E) tokens routed to each expert since the last call (MoE.forward counts them in training
    forwards), summed over ranks; resets the counts. None for a dense model."""
    layers = model.moe_layers()
    if not layers:
        return None
    loads = torch.stack([m.load.clone() for m in layers])
    for m in layers:
        m.load.zero_()
    if distributed():
        torch.distributed.all_reduce(loads)
    return loads


@torch.no_grad()
def update_router_bias(model, loads, gamma):
    """b_i += gamma * sign(mean load - load_i) per MoE layer: the correction bias only changes which experts win
    (model.Router). Every rank passes the same all-reduced loads, so every rank holds the same bias."""
    if gamma == 0 or loads is None:
        return
    for m, load in zip(model.moe_layers(), loads):
        bias = m.gate.e_score_correction_bias
        bias += gamma * torch.sign(load.mean() - load).to(bias)
