"""Hugging Face checkpoint format for model.Transformer: config.json <-> ModelConfig, and safetensors files <->
state_dict (drop/add the "model." prefix; routed experts are stacked (E, out, in) in memory and stored per expert
on disk). Families: DeepseekV3ForCausalLM, Qwen3MoeForCausalLM, Qwen3ForCausalLM, Qwen2ForCausalLM,
LlamaForCausalLM; anything else, FP8-quantised weights, or an option this model cannot reproduce exactly is
refused with a message that says what to do. load(path) -> Transformer; save(model, path).
"""
import json
import os
import re

import torch

from model import ARCHITECTURES, ModelConfig, Transformer, rope_parameters


def load(path, dtype=torch.float32, device="cpu", shard=None):
    """A Hugging Face directory (config.json + model.safetensors or a sharded index) -> Transformer.
    shard: a function applying FSDP2 to a model (dist.shard_model). The model is then built on the meta device,
    sharded, and each rank reads from the files only the rows of dim 0 it holds (experts: only its experts), so no
    rank ever materialises the whole model."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json; hf.load wants a Hugging Face model directory")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), where=cfg_path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype) if shard is None else shard(model.to(dtype))
    materialize(model, device)
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as embed_tokens.weight
    biases = {k: b for k, b in model.named_buffers() if k.endswith("e_score_correction_bias")}  # absent: stay 0
    shapes = {k: tuple(t.shape) for k, t in (params | biases).items()}  # global shapes, also under FSDP
    rows = {k: local_rows(p) for k, p in params.items()} if shard is not None else {}

    def part(k, shape):  # every rank checks the file's full shape before reading its rows: all fail alike
        if k in shapes and tuple(shape) != shapes[k]:
            raise ValueError(f"{path}: {k} has shape {tuple(shape)} in the files, but {cfg_path} implies {shapes[k]}")
        return rows.get(k, (0, shape[0]))
    state = load_hf_state(path, cfg, dtype, part=part)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    with torch.no_grad():
        for k, b in biases.items():
            if k in state:
                b.copy_(state[k])
        for k, p in params.items():
            (p.to_local() if hasattr(p, "to_local") else p).copy_(state[k])
    return model


def materialize(model, device):
    """A meta-device model -> uninitialised memory on `device` (weights are loaded afterwards), with the tied
    embedding still tied and the buffers that are not loaded (RoPE frequencies, MoE load counters, router bias) set."""
    model.to_empty(device=device)
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        if hasattr(model.embed_tokens.weight, "to_local"):
            raise NotImplementedError("tied embeddings lost their tie when FSDP materialised the model")
        model.lm_head.weight = model.embed_tokens.weight  # to_empty made two tensors of the shared one
    model.inv_freq = rope_parameters(model.config)[0]  # made on the meta device with the model: make it again
    with torch.no_grad():
        for m in model.moe_layers():
            m.load.zero_()
            m.gate.e_score_correction_bias.zero_()


def local_rows(p):
    """(start, stop): the rows of dim 0 of parameter p that this rank holds. FSDP2 shards dim 0 in torch.chunk's
    way: ceil(n / world) rows per rank, the last ranks get fewer or none."""
    if not hasattr(p, "to_local"):
        return 0, p.shape[0]
    if p.device_mesh.ndim != 1 or not p.placements[0].is_shard(0):
        raise NotImplementedError(f"sharded loading expects FSDP's Shard(0) on a 1-D mesh, got {p.placements}")
    n, W, r = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    step = -(-n // W)
    start = min(r * step, n)
    stop = min(start + step, n)
    assert p.to_local().shape[0] == stop - start, (p.shape, p.to_local().shape, W, r)
    return start, stop


def save(model, path, max_shard_bytes=5 * 2**30):
    """Write config.json + safetensors (experts per expert, as transformers and vLLM expect), in files of at most
    max_shard_bytes. Under FSDP every rank must call it: tensors are gathered one at a time and rank 0 writes a file
    whenever it has one file's worth, so no rank ever holds the whole model. Weight files of an earlier save in
    `path` are removed first; other files there are left alone."""
    from safetensors.torch import save_file
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    writer = not dist or torch.distributed.get_rank() == 0
    cfg = model.config
    if writer:  # weight files of an earlier save here would be read instead of (or mixed with) the new ones
        os.makedirs(path, exist_ok=True)
        for f in os.listdir(path):
            if re.fullmatch(r"model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors"
                            r"|part-\d+\.safetensors", f):
                os.remove(os.path.join(path, f))
    files, cur, size, total = [], {}, 0, 0

    def flush():
        nonlocal cur, size
        files.append((f"part-{len(files):05d}.safetensors", list(cur)))
        save_file(cur, os.path.join(path, files[-1][0]), metadata={"format": "pt"})
        cur, size = {}, 0
    for k, v in model.state_dict().items():  # the same order on every rank: the gathers below pair up
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        if cfg.architecture != "DeepseekV3ForCausalLM" and k.endswith("e_score_correction_bias"):
            if v.abs().max() > 0:  # the format has no place for it: refuse rather than save a different model
                raise ValueError(f"{cfg.architecture} checkpoints have no router correction bias, but {k} is "
                                 "nonzero (aux-loss-free balancing ran): keep gamma=0 for this architecture")
            continue
        v = v.full_tensor() if hasattr(v, "full_tensor") else v  # a collective under FSDP
        if not writer:
            continue
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)", k)
        named = [(f"model.layers.{m[1]}.mlp.experts.{e}.{m[2]}.weight", v[e]) for e in range(v.shape[0])] if m else \
            [(k if k.startswith("lm_head") else "model." + k, v)]
        for name, t in named:
            t = t.detach().cpu().contiguous()
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > max_shard_bytes:
                flush()
            cur[name] = t
            size, total = size + nbytes, total + nbytes
    if not writer:
        return
    if cur or not files:
        flush()
    if len(files) == 1:
        os.replace(os.path.join(path, files[0][0]), os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i, (tmp, keys) in enumerate(files):
            name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(os.path.join(path, tmp), os.path.join(path, name))
            weight_map.update({k: name for k in keys})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype), f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face config and weight mapping

_MODEL_TYPES = {"DeepseekV3ForCausalLM": "deepseek_v3", "Qwen3MoeForCausalLM": "qwen3_moe",
                "Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}


def config_from_hf(d, where="config.json"):
    """Map a Hugging Face config dict onto ModelConfig, refusing what this model cannot reproduce exactly."""
    archs = d.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {arch!r} is not supported; nano-r1 loads {', '.join(ARCHITECTURES)}")
    if d.get("quantization_config") is not None:
        raise ValueError(f"{where}: this checkpoint is quantised ({d['quantization_config'].get('quant_method')}); "
                         "convert it to bf16 first (e.g. DeepSeek-V3's inference/fp8_cast_bf16.py) and load that")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (silu only)")
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = d.get("rope_theta", rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    kind = rope.get("rope_type", rope.get("type", "default"))
    c = dict(architecture=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
             intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
             num_attention_heads=d["num_attention_heads"], rope_theta=theta,
             rope_scaling=None if kind == "default" else rope,
             max_position_embeddings=d.get("max_position_embeddings", 4096),
             rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=d.get("tie_word_embeddings", False),
             bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
             initializer_range=d.get("initializer_range", 0.02))
    if arch == "DeepseekV3ForCausalLM":
        if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"{where}: DeepSeek-V3 routing must be scoring_func=sigmoid, topk_method=noaux_tc")
        c.update({k: d[k] for k in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                    "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                                    "moe_intermediate_size", "first_k_dense_replace", "n_group", "topk_group",
                                    "norm_topk_prob", "routed_scaling_factor")})
        c.update(scoring_func="sigmoid", rope_interleave=d.get("rope_interleave", True),
                 attention_bias=d.get("attention_bias", False), attention_out_bias=d.get("attention_bias", False))
    else:
        c.update(kv_lora_rank=None, num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
                 n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=0)
        if d.get("use_sliding_window"):
            raise ValueError(f"{where}: sliding-window attention is not supported")
        if arch == "Qwen2ForCausalLM":  # q/k/v always carry a bias in Qwen2, o_proj never
            c.update(attention_bias=True, attention_out_bias=False)
        else:
            if d.get("mlp_bias"):
                raise ValueError(f"{where}: mlp_bias is not supported")
            c.update(attention_bias=d.get("attention_bias", False), attention_out_bias=d.get("attention_bias", False),
                     qk_norm=arch.startswith("Qwen3"))
        if arch == "Qwen3MoeForCausalLM":
            step = d.get("decoder_sparse_step", 1)
            L = d["num_hidden_layers"]
            dense = set(d.get("mlp_only_layers") or []) | {i for i in range(L) if (i + 1) % step}
            c.update(n_routed_experts=d.get("num_experts", d.get("num_local_experts")), scoring_func="softmax",
                     num_experts_per_tok=d["num_experts_per_tok"], moe_intermediate_size=d["moe_intermediate_size"],
                     norm_topk_prob=d.get("norm_topk_prob", False), mlp_only_layers=sorted(dense))
    return ModelConfig(**c)


def config_to_hf(cfg, dtype="float32"):
    """ModelConfig -> a config.json dict that transformers (and vLLM) load as cfg.architecture."""
    arch = cfg.architecture
    d = dict(architectures=[arch], model_type=_MODEL_TYPES[arch], vocab_size=cfg.vocab_size,
             hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
             num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
             max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
             tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu", rope_theta=cfg.rope_theta,
             initializer_range=cfg.initializer_range, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
             torch_dtype=dtype)
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    if arch == "DeepseekV3ForCausalLM":
        if cfg.attention_bias != cfg.attention_out_bias:
            raise ValueError("DeepseekV3 has one attention_bias flag: attention_bias must equal attention_out_bias")
        moe = cfg.n_routed_experts > 0
        d.update(kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                 qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                 num_key_value_heads=cfg.num_attention_heads, n_routed_experts=cfg.n_routed_experts,
                 n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 moe_intermediate_size=cfg.moe_intermediate_size,
                 first_k_dense_replace=cfg.first_k_dense_replace if moe else cfg.num_hidden_layers,
                 n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                 routed_scaling_factor=cfg.routed_scaling_factor, scoring_func="sigmoid", topk_method="noaux_tc",
                 rope_interleave=cfg.rope_interleave, attention_bias=cfg.attention_bias, num_nextn_predict_layers=0)
        if cfg.mlp_only_layers:
            raise ValueError("DeepseekV3 places dense layers with first_k_dense_replace only (mlp_only_layers=[])")
        if moe and cfg.scoring_func != "sigmoid":
            raise ValueError("DeepseekV3ForCausalLM routes with sigmoid scores; use scoring_func='sigmoid'")
        return d
    d.update(num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads, head_dim=cfg.gqa_head_dim)
    if arch == "Qwen2ForCausalLM":
        if not cfg.attention_bias or cfg.attention_out_bias or cfg.qk_norm:
            raise ValueError("Qwen2ForCausalLM has q/k/v bias, no o_proj bias and no q/k norm")
        return d
    if cfg.attention_bias != cfg.attention_out_bias:
        raise ValueError(f"{arch} has one attention_bias flag: attention_bias must equal attention_out_bias")
    if cfg.qk_norm != arch.startswith("Qwen3"):
        raise ValueError(f"{arch}: qk_norm must be {arch.startswith('Qwen3')}")
    d.update(attention_bias=cfg.attention_bias)
    if arch == "Qwen3MoeForCausalLM":
        dense = sorted(set(cfg.mlp_only_layers) | set(range(cfg.first_k_dense_replace)))
        d.update(num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                 decoder_sparse_step=1, mlp_only_layers=dense)
    return d


def load_hf_state(path, cfg, dtype, part=None):
    """Read safetensors into our state_dict naming: drop 'model.', stack per-expert tensors, skip layers beyond
    num_hidden_layers (DeepSeek-V3's multi-token-prediction module), refuse FP8 block-quantised weights.
    part(name, shape) -> (start, stop): read only those rows of dim 0 of our tensor `name`, whose full shape in the
    files is `shape` (for stacked experts a row is an expert); default: every row."""
    from safetensors import safe_open
    part = part or (lambda k, shape: (0, shape[0]))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state, experts = {}, {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                if key.endswith("weight_scale_inv"):
                    raise ValueError(f"{path}/{name}: {key} is an FP8 block scale; convert the checkpoint to bf16 "
                                     "first (e.g. DeepSeek-V3's inference/fp8_cast_bf16.py)")
                k = key[len("model."):] if key.startswith("model.") else key
                m = re.match(r"layers\.(\d+)\.", k)
                if m and int(m[1]) >= cfg.num_hidden_layers:
                    continue
                if k.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and k == "lm_head.weight"):
                    continue
                cast = lambda t: t.float() if k.endswith("e_score_correction_bias") else t.to(dtype)  # noqa: E731
                m = re.fullmatch(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", k)
                if m:
                    stacked, e = f"{m[1]}.{m[3]}", int(m[2])
                    shape = f.get_slice(key).get_shape()
                    start, stop = part(stacked, (cfg.n_routed_experts, *shape))
                    per = experts.setdefault(stacked, {"range": (start, stop), "found": set(), "shape": shape})
                    per["found"].add(e)
                    if start <= e < stop:  # this rank's expert
                        per[e] = cast(f.get_tensor(key))
                    continue
                sl = f.get_slice(key)
                if k.endswith("mlp.experts.gate_up_proj"):  # transformers 5's fused in-memory layout (E, 2I, D)
                    E, I2, D = sl.get_shape()
                    start, stop = part(k.replace("gate_up_proj", "gate_proj"), (E, I2 // 2, D))
                    gate, up = cast(sl[start:stop]).chunk(2, dim=1)
                    state[k.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
                    state[k.replace("gate_up_proj", "up_proj")] = up.contiguous()
                else:
                    shape = sl.get_shape()
                    start, stop = part(k, shape) if shape else (0, 0)
                    state[k] = cast(sl[start:stop] if shape else f.get_tensor(key))
    for k, per in experts.items():
        if sorted(per["found"]) != list(range(cfg.n_routed_experts)):
            raise ValueError(f"{path}: {k}: found experts {sorted(per['found'])[:5]}..., expected 0.."
                             f"{cfg.n_routed_experts - 1}")
        start, stop = per["range"]
        state[k] = torch.stack([per[e] for e in range(start, stop)]) if stop > start else \
            torch.empty(0, *per["shape"], dtype=dtype)  # a rank holding no expert (more ranks than experts)
    return state
