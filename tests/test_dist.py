import random

import numpy as np
import pytest
import torch

import dist
from config import ConfigError


def test_seeding_and_rng_state_roundtrip():
    dist.seed_everything(3)
    state = dist.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    dist.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_dtype_and_device():
    assert dist.get_dtype("auto", torch.device("cpu")) == torch.float32
    assert dist.get_dtype("bf16") == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype 'half-ish'"):
        dist.get_dtype("half-ish")
    assert dist.get_device("cpu").type == "cpu" and isinstance(dist.cpu_has_bf16(), bool)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, capsys, native):
    monkeypatch.setattr(dist, "cpu_has_bf16", lambda: native)
    assert dist.get_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert dist.get_dtype("fp32", torch.device("cpu")) == torch.float32
    out = capsys.readouterr().out
    assert ("WARNING --dtype=bf16: this CPU has no native bf16 matmul" in out) != native
    assert out.count("WARNING") == (0 if native else 1)  # the fp32 call does not warn
