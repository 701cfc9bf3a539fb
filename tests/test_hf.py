"""hf.py: Hugging Face checkpoints load with logits equal to transformers', save for transformers, and refuse what
they cannot reproduce."""
import json
import os

import pytest
import torch

import hf
from model import ModelConfig, Transformer
from test_model import T, V, perturb


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
    d, theirs = hf_dirs[name]
    tokens = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(tokens).logits
        ours = hf.load(d).eval()
        out = ours(tokens)
    assert out.shape == (2, T, V)
    assert (out - ref).abs().max().item() < 1e-4, name
    # and back: our hf.save loads in transformers with the same logits
    hf.save(ours, str(tmp_path))
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
                hf.save(m, d)
            for moe in m.moe_layers():
                moe.gate.e_score_correction_bias.zero_()
        hf.save(m, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
        tokens = torch.randint(0, V, (2, T))
        with torch.no_grad():
            assert (theirs(tokens).logits - m(tokens)).abs().max().item() < 1e-4, cfg.architecture
        again = hf.load(d).eval()
        with torch.no_grad():
            assert torch.equal(again(tokens), m(tokens))


def test_sharded_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = perturb(Transformer(ModelConfig(vocab_size=V))).eval()
    hf.save(m, str(tmp_path), max_shard_bytes=200_000)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    tokens = torch.randint(0, V, (1, T))
    with torch.no_grad():
        assert torch.equal(hf.load(str(tmp_path))(tokens), m(tokens))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        hf.load(str(tmp_path))
    m = Transformer(ModelConfig(vocab_size=V))
    hf.save(m, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match="quantised.*fp8_cast_bf16"):
        hf.load(str(tmp_path))
    # an FP8 block scale in the weights without a quantization_config
    from safetensors.torch import load_file, save_file
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="FP8 block scale"):
        hf.load(str(tmp_path))


def test_saving_over_an_earlier_save_leaves_no_stale_weights(tmp_path):
    """A sharded save followed by a single-file save (and back) in one directory: only the new files remain, so
    our loader (which prefers an index) and transformers (which prefers model.safetensors) read the same model."""
    torch.manual_seed(0)
    old, new = Transformer(ModelConfig(vocab_size=V)).eval(), Transformer(ModelConfig(vocab_size=V)).eval()
    (tmp_path / "notes.txt").write_text("mine")
    tokens = torch.randint(0, V, (1, T))
    for first, second, shards in ((old, new, 200_000), (new, old, 5 * 2**30)):
        hf.save(first, str(tmp_path), max_shard_bytes=shards)
        hf.save(second, str(tmp_path), max_shard_bytes=5 * 2**30 if shards < 2**30 else 200_000)
        with torch.no_grad():
            assert torch.equal(hf.load(str(tmp_path))(tokens), second(tokens))
    assert (tmp_path / "notes.txt").read_text() == "mine"  # other files are left alone


def test_shape_mismatch_and_partial_reads(tmp_path):
    """A file whose rows disagree with config.json is refused naming both shapes (before anything is read, the
    same on every rank); part= reads only the asked rows, for plain, per-expert and fused gate_up tensors."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=V, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                                topk_group=1)).eval()
    hf.save(m, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": V - 3}))
    with pytest.raises(ValueError, match=rf"(embed_tokens|lm_head).weight has shape \({V}, \d+\) in the files, but .*config.json "
                                         rf"implies \({V - 3}, "):
        hf.load(str(tmp_path))
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
        assert torch.equal(hf.load(str(tmp_path))(tokens), m(tokens))


def test_mtp_layers_beyond_num_hidden_layers_are_skipped(tmp_path):
    cfg = ModelConfig(vocab_size=V, num_hidden_layers=2)
    m = Transformer(cfg).eval()
    hf.save(m, str(tmp_path))
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.2.eh_proj.weight"] = torch.ones(4, 4)  # V3's MTP module lives at layer index L
    save_file(sd, str(tmp_path / "model.safetensors"))
    tokens = torch.randint(0, V, (1, T))
    with torch.no_grad():
        assert torch.equal(hf.load(str(tmp_path))(tokens), m(tokens))
