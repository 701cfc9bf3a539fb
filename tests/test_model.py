import pytest
import torch
import torch.nn.functional as F

import model as M
import optim
from model import ModelConfig, Transformer
from rollout import KVCache

V = 203  # not a multiple of 64
T = 13   # not a power of two


def perturb(m, seed=0):
    """Random norms, biases and router correction bias, so no path hides behind an identity/zero init (M1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.rand(b.shape, generator=g))
    return m


def test_rope_frequencies_stay_fp32_under_bf16():
    m = Transformer(ModelConfig(vocab_size=V)).to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32


def test_router_bias_is_bit_identical_after_dtype_moves():
    """model.to(bf16) once rounded the correction bias through bf16 (values moved by up to ~7e-3)."""
    m = Transformer(ModelConfig(vocab_size=V))
    gen = torch.Generator().manual_seed(0)
    for r in (l.mlp.gate for l in m.layers if isinstance(l.mlp, M.MoE)):
        r.e_score_correction_bias.copy_(torch.randn(r.e_score_correction_bias.shape, generator=gen) * 0.3 + 0.123456)
    before = [l.mlp.gate.e_score_correction_bias.clone() for l in m.layers if isinstance(l.mlp, M.MoE)]
    assert before and any((b.bfloat16().float() != b).any() for b in before)  # values bf16 cannot hold
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        m.to(dt)
        after = [l.mlp.gate.e_score_correction_bias for l in m.layers if isinstance(l.mlp, M.MoE)]
        assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(after, before)), dt
    m.half().float()
    assert all(torch.equal(l.mlp.gate.e_score_correction_bias, b)
               for l, b in zip([l for l in m.layers if isinstance(l.mlp, M.MoE)], before))


def test_router_scores_stay_fp32_under_autocast():
    """Under bf16 autocast the router's explicit fp32 linear was run in bf16: gates came back bf16 and near-ties
    chose other experts than without autocast (a sampler/trainer routing mismatch)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, n_routed_experts=16, num_experts_per_tok=4)
    r = M.Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.02)
    x = torch.randn(4096, cfg.hidden_size)
    idx, w, scores = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_ac, w_ac, scores_ac = r(x)
        # a bf16 linear, as autocast ran it before: near-ties do flip, so the test can tell the two apart
        flipped = M.stable_topk(F.linear(x, r.weight).float().sigmoid(), 4)
    assert scores_ac.dtype == torch.float32 and w_ac.dtype == torch.float32
    assert torch.equal(scores_ac, scores) and torch.equal(idx_ac, idx) and torch.equal(w_ac, w)
    assert not torch.equal(flipped, idx)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_group"):
        ModelConfig(n_routed_experts=6, n_group=4)
    with pytest.raises(ValueError, match=">= 2 experts per group"):
        ModelConfig(n_routed_experts=4, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="needs kv_lora_rank"):
        ModelConfig(kv_lora_rank=None)
    with pytest.raises(ValueError, match="dense family"):
        ModelConfig(architecture="LlamaForCausalLM", kv_lora_rank=None)


@pytest.mark.parametrize("arch", ["mla", "mla_qlora", "gqa"])
def test_cached_decode_equals_full_forward_fp64(arch):
    """Prefill (expanded MLA) then token-by-token decode (absorbed MLA / GQA cache), ragged rows, in fp64."""
    if arch == "gqa":
        cfg = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=V, kv_lora_rank=None, num_key_value_heads=2,
                          qk_norm=True, n_shared_experts=0, scoring_func="softmax", n_routed_experts=4)
    else:
        cfg = ModelConfig(vocab_size=V, q_lora_rank=24 if arch == "mla_qlora" else None, n_group=2, topk_group=1,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                        "mscale": 1.0, "mscale_all_dim": 1.0})
    torch.manual_seed(0)
    m = perturb(Transformer(cfg)).double().eval()
    tokens = torch.randint(0, V, (3, T))
    prompt_lens = torch.tensor([5, 2, 7])  # ragged prompts share one prefill, right-padded to 7
    with torch.no_grad():
        full = m(tokens)  # (3, T, V)
        cache = KVCache(cfg, 3, T + 2, dtype=torch.float64)
        pre = m(tokens[:, :7], cache, n_new=prompt_lens)
        for b in range(3):
            n = prompt_lens[b]
            assert (pre[b, :n] - full[b, :n]).abs().max() < 1e-10
        # decode: each row continues from its own length
        for step in range(T - 7):
            pos = cache.lengths.clone()
            nxt = tokens[torch.arange(3), pos]  # (3,)
            out = m(nxt[:, None], cache)  # (3, 1, V)
            assert (out[:, 0] - full[torch.arange(3), pos]).abs().max() < 1e-10
    assert cache.lengths.tolist() == (prompt_lens + T - 7).tolist()


def test_cache_select_replicates_rows():
    cfg = ModelConfig(vocab_size=V)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    tokens = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        cache = KVCache(cfg, 2, 8)
        m(tokens, cache)
        cache.select(torch.tensor([0, 0, 1, 1]))  # one prefill -> 2 samples per prompt
        nxt = torch.randint(0, V, (4, 1))
        out = m(nxt, cache)
        full = m(torch.cat([tokens.repeat_interleave(2, 0), nxt], 1))
    assert (out[:, 0] - full[:, -1]).abs().max() < 1e-5


def naive_moe(moe, x):
    """Per-token reference: route each token alone, loop over its experts."""
    cfg, out = moe.cfg, []
    for tok in x.reshape(-1, x.shape[-1]):
        s = moe.gate.scores(tok[None])[0]
        choice = s + moe.gate.e_score_correction_bias
        if cfg.n_group > 1:
            g = choice.view(cfg.n_group, -1)
            best = sorted(range(cfg.n_group), key=lambda i: -g[i].topk(2).values.sum().item())[:cfg.topk_group]
            choice = torch.stack([choice[j] if j // g.shape[1] in best else torch.tensor(-float("inf"),
                                 dtype=choice.dtype) for j in range(len(choice))])
        idx = sorted(range(len(choice)), key=lambda j: -choice[j].item())[:cfg.num_experts_per_tok]
        w = s[idx]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        y = sum(wi * F.linear(F.silu(F.linear(tok, moe.experts.gate_proj[e])) * F.linear(tok, moe.experts.up_proj[e]),
                              moe.experts.down_proj[e]) for wi, e in zip(w * cfg.routed_scaling_factor, idx))
        out.append(y + (moe.shared_experts(tok) if moe.shared_experts is not None else 0))
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("negative_bias", [False, True])
def test_sorted_dispatch_equals_naive_per_token(scoring, negative_bias):
    cfg = ModelConfig(vocab_size=V, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                      scoring_func=scoring, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    moe = perturb(Transformer(cfg)).layers[1].mlp.eval()
    if negative_bias:  # every biased score < 0: masking dropped groups with 0 instead of -inf would pick them (M4)
        with torch.no_grad():
            moe.gate.e_score_correction_bias.copy_(-1.0 - torch.rand(8))
    x = torch.randn(2, 9, cfg.hidden_size)
    with torch.no_grad():
        ref = naive_moe(moe.double(), x.double())
        fast = moe(x.double())  # fp64: the per-expert loop path
        moe.float()
        grouped = moe(x)  # fp32: torch._grouped_mm
        xf = x.reshape(-1, cfg.hidden_size)
        idx, w, _ = moe.gate(xf)
        loop = moe.experts(xf, idx, w, use_grouped_mm=False)
    assert (fast - ref).abs().max() < 1e-10
    assert (grouped - ref.float()).abs().max() < 1e-5
    assert (loop + moe.shared_experts(x).reshape(-1, cfg.hidden_size) - grouped.reshape(-1, cfg.hidden_size)
            ).abs().max() < 1e-5


def test_grouped_mm_backward_matches_loop():
    cfg = ModelConfig(vocab_size=V, n_routed_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    ex = Transformer(cfg).layers[1].mlp.experts
    x = torch.randn(20, cfg.hidden_size, requires_grad=True)
    idx = torch.randint(0, 6, (20, 2))  # experts 6, 7 get no tokens: empty groups
    idx[:, 1] = (idx[:, 0] + 1) % 6
    w = torch.rand(20, 2)
    grads = []
    for grouped in (True, False):
        x.grad = None
        ex.zero_grad()
        y = ex(x, idx, w, use_grouped_mm=grouped)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in ex.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-5


def test_one_expert_top1_equals_plain_mlp():
    cfg = ModelConfig(vocab_size=V, n_routed_experts=1, num_experts_per_tok=1, n_shared_experts=0,
                      first_k_dense_replace=0, moe_intermediate_size=48)
    torch.manual_seed(0)
    moe = Transformer(cfg).layers[0].mlp
    mlp = M.MLP(cfg.hidden_size, 48)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(moe.experts.gate_proj[0])
        mlp.up_proj.weight.copy_(moe.experts.up_proj[0])
        mlp.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(2, 5, cfg.hidden_size)
    assert (moe(x) - mlp(x)).abs().max() < 1e-6


def test_topk_ties_break_to_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9]])
    assert M.stable_topk(scores, 2).tolist() == [[1, 2]]
    assert M.stable_topk(scores.repeat(5, 1), 3).tolist() == [[1, 2, 4]] * 5


def test_balance_loss_gradient_reaches_only_the_router():
    cfg = ModelConfig(vocab_size=V, aux_loss_alpha=0.01)
    torch.manual_seed(0)
    m = Transformer(cfg).train()
    tokens = torch.randint(0, V, (2, 9))
    m(tokens)
    aux = m.aux_loss()
    assert aux.item() > 0
    aux.backward()
    for name, p in m.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum() > 0
        assert touched == name.endswith("mlp.gate.weight"), name
    # and it is in the total: the router gradient of (loss + aux) differs from that of loss alone
    m.zero_grad()
    logits = m(tokens)
    (logits.square().mean()).backward(retain_graph=True)
    g0 = m.layers[1].mlp.gate.weight.grad.clone()
    m.aux_loss().backward()
    assert not torch.allclose(m.layers[1].mlp.gate.weight.grad, g0)


def test_balance_loss_is_one_for_uniform_routing():
    # f_i = P_i-normalised shares; with every expert equally loaded and equal scores, sum_i f_i P_i = 1
    cfg = ModelConfig(vocab_size=V, n_routed_experts=4, num_experts_per_tok=2, aux_loss_alpha=1.0)
    moe = Transformer(cfg).layers[1].mlp
    with torch.no_grad():
        moe.gate.weight.zero_()
    idx = torch.tensor([[0, 1], [2, 3]])
    loss = moe.balance_loss(torch.randn(2, cfg.hidden_size), idx, torch.ones(1, 2, dtype=torch.bool))
    assert abs(loss.item() - 1.0) < 1e-6


def test_moe_statistics_ignore_padding():
    """Expert loads and the balance loss count real tokens only: padding a batch does not change them (P3, P17)."""
    cfg = ModelConfig(vocab_size=V, aux_loss_alpha=0.1)
    torch.manual_seed(0)
    m = Transformer(cfg).train()
    tokens = torch.randint(0, V, (2, 9))
    m(tokens)
    loads, aux = optim.pop_expert_loads(m), m.aux_loss().item()
    padded = torch.cat([tokens, torch.randint(0, V, (2, 4))], 1)  # 4 garbage positions after every real token
    valid = torch.arange(13).expand(2, 13) < 9
    m(padded, valid=valid)
    assert torch.equal(optim.pop_expert_loads(m), loads) and abs(m.aux_loss().item() - aux) < 1e-7
    m(padded)  # without the mask the garbage counts: the test would catch a lost mask
    assert not torch.equal(optim.pop_expert_loads(m), loads)
    with torch.no_grad():  # no-grad passes (old/ref log-probs) never count
        m(tokens)
    assert optim.pop_expert_loads(m).sum() == 0


def test_return_hidden_feeds_the_lm_head():
    m = Transformer(ModelConfig(vocab_size=V)).eval()
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        h = m(tokens, return_hidden=True)
        assert h.shape == (2, T, m.config.hidden_size)
        assert torch.allclose(m.lm_head(h), m(tokens))


def test_routing_replay_reproduces_recorded_experts():
    cfg = ModelConfig(vocab_size=V)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        ref = m(tokens)
        recorded = m.moe_routes()  # (B, T, n_moe, K)
        assert recorded.shape == (2, T, len(m.moe_layers()), cfg.num_experts_per_tok)
        assert torch.allclose(m(tokens, routes=recorded), ref, atol=1e-6)
        # force other experts: the output must change
        assert not torch.allclose(m(tokens, routes=torch.zeros_like(recorded)), ref, atol=1e-3)


