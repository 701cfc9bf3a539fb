import pytest
import torch

import optim
from config import ConfigError
from model import ModelConfig, Transformer
from test_model import V


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


def test_bias_update_moves_skewed_router_toward_balance():
    cfg = ModelConfig(vocab_size=V, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=0,
                      num_hidden_layers=1)
    torch.manual_seed(0)
    m = Transformer(cfg).train()
    gate = m.layers[0].mlp.gate
    x = torch.randint(0, V, (8, 16))
    seen = []
    hook = m.layers[0].mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].reshape(-1, 128)))
    with torch.no_grad():
        m(x)
    hook.remove()
    optim.pop_expert_loads(m)
    u = seen[0].mean(0)  # the direction every token's MoE input shares
    with torch.no_grad():
        gate.weight[:2] += 8 * u / u.norm() ** 2  # experts 0 and 1 now win for nearly every token

    def imbalance():
        m(x)
        load = optim.pop_expert_loads(m)[0]
        return (load.max() / load.mean()).item(), load
    before, load0 = imbalance()
    for _ in range(60):
        m(x)
        optim.update_router_bias(m, optim.pop_expert_loads(m), gamma=0.02)
    after, _ = imbalance()
    assert load0.sum() == 8 * 16 * 2
    assert before > 3.0 and after < 1.6, (before, after)  # sign updates hover within ~gamma of balance
    assert m.layers[0].mlp.gate.e_score_correction_bias[:2].max() < 0  # the overloaded experts were pushed down
