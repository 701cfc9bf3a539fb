import json
import os

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import KVCache, ModelConfig, Transformer

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


def hf_models():
    transformers = pytest.importorskip("transformers")
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 0.707}
    return {
        # q low-rank + YaRN in the old `rope_scaling` style, groups, random correction bias
        "deepseek_v3": transformers.DeepseekV3Config(
            vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=32, q_lora_rank=24,
            qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=3,
            first_k_dense_replace=1, routed_scaling_factor=2.5, rope_scaling=yarn, max_position_embeddings=256),
        # q_lora_rank null, plain RoPE, no groups
        "deepseek_v3_plainq": transformers.DeepseekV3Config(
            vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, n_shared_experts=2, n_routed_experts=4, kv_lora_rank=16, q_lora_rank=None,
            qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=1, topk_group=1, num_experts_per_tok=2,
            first_k_dense_replace=0, norm_topk_prob=False),
        "qwen3_moe": transformers.Qwen3MoeConfig(
            vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, mlp_only_layers=[1]),
        "qwen2": transformers.Qwen2Config(
            vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True),
        "llama": transformers.LlamaConfig(
            vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=512,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    }


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = {}
    for i, (name, cfg) in enumerate(hf_models().items()):
        torch.manual_seed(i)
        m = perturb(transformers.AutoModelForCausalLM.from_config(cfg).float().eval(), seed=i)
        d = str(tmp_path_factory.mktemp(name))
        m.save_pretrained(d)
        out[name] = (d, m)
    return out


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3_plainq", "qwen3_moe", "qwen2", "llama"])
def test_hf_parity_load_and_save(name, hf_dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    d, hf = hf_dirs[name]
    tokens = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = Transformer.from_pretrained(d).eval()
        out = ours(tokens)
    assert out.shape == (2, T, V)
    assert (out - ref).abs().max().item() < 1e-4, name
    # and back: our save_pretrained loads in transformers with the same logits
    ours.save_pretrained(str(tmp_path))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    with torch.no_grad():
        assert (back(tokens).logits - ref).abs().max().item() < 1e-4, name


def test_model_built_from_config_alone_saves_for_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for i, cfg in enumerate([ModelConfig(vocab_size=V, n_group=2, topk_group=1, routed_scaling_factor=1.5),
                             ModelConfig(vocab_size=V, n_routed_experts=0),  # dense MLA control
                             ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=V, kv_lora_rank=None,
                                         num_key_value_heads=2, qk_norm=True, n_shared_experts=0,
                                         scoring_func="softmax", tie_word_embeddings=True)]):
        torch.manual_seed(i)
        m = perturb(Transformer(cfg), seed=i).eval()
        d = str(tmp_path / str(i))
        if cfg.architecture == "Qwen3MoeForCausalLM":
            with pytest.raises(ValueError, match="no router correction bias"):
                m.save_pretrained(d)
            for moe in m.moe_layers():
                moe.gate.e_score_correction_bias.zero_()
        m.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
        tokens = torch.randint(0, V, (2, T))
        with torch.no_grad():
            assert (hf(tokens).logits - m(tokens)).abs().max().item() < 1e-4, cfg.architecture
        again = Transformer.from_pretrained(d).eval()
        with torch.no_grad():
            assert torch.equal(again(tokens), m(tokens))


def test_sharded_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = perturb(Transformer(ModelConfig(vocab_size=V))).eval()
    m.save_pretrained(str(tmp_path), max_shard_bytes=200_000)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    tokens = torch.randint(0, V, (1, T))
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(str(tmp_path))(tokens), m(tokens))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        Transformer.from_pretrained(str(tmp_path))
    m = Transformer(ModelConfig(vocab_size=V))
    m.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match="quantised.*fp8_cast_bf16"):
        Transformer.from_pretrained(str(tmp_path))
    # an FP8 block scale in the weights without a quantization_config
    from safetensors.torch import load_file, save_file
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="FP8 block scale"):
        Transformer.from_pretrained(str(tmp_path))


def test_saving_over_an_earlier_save_leaves_no_stale_weights(tmp_path):
    """A sharded save followed by a single-file save (and back) in one directory: only the new files remain, so
    our loader (which prefers an index) and transformers (which prefers model.safetensors) read the same model."""
    torch.manual_seed(0)
    old, new = Transformer(ModelConfig(vocab_size=V)).eval(), Transformer(ModelConfig(vocab_size=V)).eval()
    (tmp_path / "notes.txt").write_text("mine")
    tokens = torch.randint(0, V, (1, T))
    for first, second, shards in ((old, new, 200_000), (new, old, 5 * 2**30)):
        first.save_pretrained(str(tmp_path), max_shard_bytes=shards)
        second.save_pretrained(str(tmp_path), max_shard_bytes=5 * 2**30 if shards < 2**30 else 200_000)
        with torch.no_grad():
            assert torch.equal(Transformer.from_pretrained(str(tmp_path))(tokens), second(tokens))
    assert (tmp_path / "notes.txt").read_text() == "mine"  # other files are left alone


def test_shape_mismatch_and_partial_reads(tmp_path):
    """A file whose rows disagree with config.json is refused naming both shapes (before anything is read, the
    same on every rank); part= reads only the asked rows, for plain, per-expert and fused gate_up tensors."""
    import hf
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=V, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                                topk_group=1)).eval()
    m.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": V - 3}))
    with pytest.raises(ValueError, match=rf"(embed_tokens|lm_head).weight has shape \({V}, \d+\) in the files, but .*config.json "
                                         rf"implies \({V - 3}, "):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    full = m.state_dict()
    rows = lambda k, shape: (1, 3) if shape[0] == 4 else (0, shape[0])  # noqa: E731 experts 1..2 only
    state = hf.load_hf_state(str(tmp_path), m.config, torch.float32, part=rows)
    assert torch.equal(state["layers.1.mlp.experts.down_proj"], full["layers.1.mlp.experts.down_proj"][1:3])
    # transformers 5's fused in-memory layout written to disk: (E, 2I, D) gate_up_proj per layer
    sd = load_file(str(tmp_path / "model.safetensors"))
    for L in range(1, m.config.num_hidden_layers):
        pre = f"model.layers.{L}.mlp.experts"
        gate = torch.stack([sd.pop(f"{pre}.{e}.gate_proj.weight") for e in range(4)])
        up = torch.stack([sd.pop(f"{pre}.{e}.up_proj.weight") for e in range(4)])
        sd[f"{pre}.gate_up_proj"] = torch.cat([gate, up], dim=1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    state = hf.load_hf_state(str(tmp_path), m.config, torch.float32, part=rows)
    for name in ("gate_proj", "up_proj"):
        assert torch.equal(state[f"layers.1.mlp.experts.{name}"], full[f"layers.1.mlp.experts.{name}"][1:3])
    tokens = torch.randint(0, V, (1, T))
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(str(tmp_path))(tokens), m(tokens))


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


def test_mtp_layers_beyond_num_hidden_layers_are_skipped(tmp_path):
    cfg = ModelConfig(vocab_size=V, num_hidden_layers=2)
    m = Transformer(cfg).eval()
    m.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.2.eh_proj.weight"] = torch.ones(4, 4)  # V3's MTP module lives at layer index L
    save_file(sd, str(tmp_path / "model.safetensors"))
    tokens = torch.randint(0, V, (1, T))
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(str(tmp_path))(tokens), m(tokens))


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
    m.pop_expert_loads()
    u = seen[0].mean(0)  # the direction every token's MoE input shares
    with torch.no_grad():
        gate.weight[:2] += 8 * u / u.norm() ** 2  # experts 0 and 1 now win for nearly every token

    def imbalance():
        m(x)
        load = m.pop_expert_loads()[0]
        return (load.max() / load.mean()).item(), load
    before, load0 = imbalance()
    for _ in range(60):
        m(x)
        m.update_router_bias(m.pop_expert_loads(), gamma=0.02)
    after, _ = imbalance()
    assert load0.sum() == 8 * 16 * 2
    assert before > 3.0 and after < 1.6, (before, after)  # sign updates hover within ~gamma of balance
    assert m.layers[0].mlp.gate.e_score_correction_bias[:2].max() < 0  # the overloaded experts were pushed down


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
    loads, aux = m.pop_expert_loads(), m.aux_loss().item()
    padded = torch.cat([tokens, torch.randint(0, V, (2, 4))], 1)  # 4 garbage positions after every real token
    valid = torch.arange(13).expand(2, 13) < 9
    m(padded, valid=valid)
    assert torch.equal(m.pop_expert_loads(), loads) and abs(m.aux_loss().item() - aux) < 1e-7
    m(padded)  # without the mask the garbage counts: the test would catch a lost mask
    assert not torch.equal(m.pop_expert_loads(), loads)
    with torch.no_grad():  # no-grad passes (old/ref log-probs) never count
        m(tokens)
    assert m.pop_expert_loads().sum() == 0


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
    moe = m.layers[1].mlp
    moe.record = []
    with torch.no_grad():
        ref = m(tokens)
    recorded, moe.record = moe.record[0], None
    moe.replay = recorded
    with torch.no_grad():
        assert torch.allclose(m(tokens), ref, atol=1e-6)
        moe.replay = torch.zeros_like(recorded)  # force other experts: the output must change
        assert not torch.allclose(m(tokens), ref, atol=1e-3)


def test_load_model_from_checkpoint_run_dir_and_hf_dir(tmp_path):
    import dataclasses
    import common
    m = perturb(Transformer(ModelConfig(vocab_size=V))).eval()
    common.save_checkpoint(str(tmp_path / "run"), 5, {"model": m}, torch.optim.SGD(m.parameters(), lr=0.1),
                           {"model_config": dataclasses.asdict(m.config)})
    m.save_pretrained(str(tmp_path / "hf"))
    tokens = torch.randint(0, V, (1, T))
    with torch.no_grad():
        ref = m(tokens)
        for path in (tmp_path / "run", tmp_path / "run" / "ckpt_0000005.pt", tmp_path / "hf"):
            assert torch.equal(M.load_model(str(path)).eval()(tokens), ref), path
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face"):
        M.load_model(str(tmp_path))
