import pytest
import torch

import optim
from config import ConfigError


def test_lr_schedule():
    assert optim.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert optim.lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert optim.lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert optim.lr_at(100, 1.0, 10, 100, min_lr_frac=0.1) == pytest.approx(0.1)
    assert optim.lr_at(55, 1.0, 10, 100, min_lr_frac=0.0) == pytest.approx(0.5)
    assert optim.lr_at(50, 2.0, 0, 100, schedule="constant") == 2.0
    with pytest.raises(ConfigError, match="lr-schedule"):
        optim.lr_at(50, 2.0, 0, 100, schedule="linear")


def test_adamw_decays_matrices_only():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = optim.adamw(m, 1e-3, weight_decay=0.1)
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert rest["weight_decay"] == 0.0 and len(rest["params"]) == 3
