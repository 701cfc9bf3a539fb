"""What a training run records: metrics.jsonl, one JSON object per step (mirrored to wandb when a project is
given), and other JSONL logs such as grpo.py's samples.jsonl. Rank 0 writes; the other ranks' calls do nothing.
"""
import dataclasses
import json
import os

import numpy as np
import torch

from dist import rank


class MetricsLogger:
    """Appends one JSON object per call to `metrics.jsonl` (rank 0) and mirrors it to wandb when a project is
    given. wandb is imported only then, and `mode=offline` works without a network."""

    def __init__(self, out_dir, config=None, wandb_project="", wandb_mode="online", run_name=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.wandb = None
        if rank() != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        if wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=run_name, mode=wandb_mode, dir=out_dir,
                                    config=dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config)

    def log(self, metrics, step):
        if rank() != 0:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def expert_imbalance(loads):
    """(n_moe_layers, E) tokens per expert -> per layer, the busiest expert's load over the mean (1 = balanced)."""
    return (loads.max(1).values / loads.mean(1).clamp(min=1e-9)).tolist()


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def append_jsonl(path, rows):
    if rank() != 0:
        return
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
