"""The nano-r1 transformer: DeepSeek-V3-style MoE with MLA, plus the GQA/dense variants of Qwen and Llama.

One class, `Transformer(ModelConfig)`, covers five Hugging Face architectures with logits equal to `transformers`':
  DeepseekV3ForCausalLM  MLA attention, sigmoid router with the selection-only correction bias, group-limited
                         top-k, shared + routed experts, the first `first_k_dense_replace` layers dense
  Qwen3MoeForCausalLM    GQA with per-head q/k RMSNorm, softmax router, routed experts only
  Qwen3ForCausalLM,      dense GQA (Qwen3: q/k norm; Qwen2: q/k/v bias; Llama: Llama 3 RoPE scaling)
  Qwen2ForCausalLM, LlamaForCausalLM
Module and parameter names follow Hugging Face's, so a checkpoint maps onto `state_dict()` by dropping "model.";
only routed experts differ: stacked (E, out, in) here, to run as one grouped matmul, per expert in files. hf.py does
that mapping (hf.load, hf.save), checkpoint.py builds a model from a path, rollout.py holds the KV cache: this file
is the model alone. Reading order: config -> norms and RoPE -> attention (MLA, GQA) -> MLP and MoE -> Transformer.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

ARCHITECTURES = ("DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM",
                 "LlamaForCausalLM")


@dataclass
class ModelConfig:
    """Model shape. Field names are Hugging Face's, so a config.json maps onto it (hf.config_from_hf)."""
    architecture: str = "DeepseekV3ForCausalLM"  # what hf.save writes; one of ARCHITECTURES
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384           # dense MLP width (dense layers, dense models)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # attention: MLA when kv_lora_rank is set, else GQA
    kv_lora_rank: Optional[int] = 64       # MLA: width of the cached, normalised KV latent
    q_lora_rank: Optional[int] = None      # MLA: low-rank query (None: a plain q_proj)
    qk_nope_head_dim: int = 32             # MLA: per-head query/key dims without position
    qk_rope_head_dim: int = 16             # MLA: per-head rotary dims (one rope key shared by all heads)
    v_head_dim: int = 32                   # MLA: per-head value dim
    num_key_value_heads: Optional[int] = None  # GQA: None = num_attention_heads
    head_dim: Optional[int] = None         # GQA: None = hidden_size // num_attention_heads
    qk_norm: bool = False                  # GQA: Qwen3's per-head RMSNorm on q and k
    attention_bias: bool = False           # bias on q/k/v (Qwen2, Llama) or on q_a/kv_a (DeepSeek)
    attention_out_bias: bool = False       # bias on o_proj (Llama/DeepSeek attention_bias; not Qwen2)
    # mixture of experts (n_routed_experts = 0: a dense model)
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    first_k_dense_replace: int = 1         # the first k layers use a dense MLP
    mlp_only_layers: list = field(default_factory=list)  # further dense layers (Qwen3-MoE)
    n_group: int = 1                       # experts are split into n_group groups ...
    topk_group: int = 1                    # ... and each token picks experts from its topk_group best groups
    scoring_func: str = "sigmoid"          # "sigmoid" (DeepSeek-V3) or "softmax" (Qwen3-MoE)
    norm_topk_prob: bool = True            # renormalise the chosen experts' scores to sum to 1
    routed_scaling_factor: float = 1.0     # multiplies the routed experts' gate weights
    aux_loss_alpha: float = 0.0            # sequence-wise balance loss weight (V3 uses a tiny one; 0 = off)
    # positions and the rest
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None    # {"rope_type": "yarn"|"llama3", "factor": ..., ...} or None
    rope_interleave: bool = True           # MLA: rotate adjacent pairs (x0,x1),(x2,x3) as DeepSeek checkpoints do
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None  # int or list of ints; informational (written to config.json)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")
        need(self.architecture in ARCHITECTURES, f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        need(self.vocab_size > 0 and self.hidden_size > 0 and self.num_hidden_layers > 0, "sizes must be positive")
        if self.use_mla:
            need(self.architecture == "DeepseekV3ForCausalLM", "MLA (kv_lora_rank set) is DeepseekV3ForCausalLM")
            need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        else:
            need(self.architecture != "DeepseekV3ForCausalLM", "DeepseekV3ForCausalLM needs kv_lora_rank (MLA)")
            kvh = self.num_key_value_heads or self.num_attention_heads
            need(self.num_attention_heads % kvh == 0, "num_attention_heads must be a multiple of num_key_value_heads")
            need(self.gqa_head_dim % 2 == 0, "head_dim must be even")
        need(self.scoring_func in ("sigmoid", "softmax"), f"scoring_func {self.scoring_func!r}: sigmoid or softmax")
        if self.n_routed_experts > 0:
            need(self.architecture in ("DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM"),
                 f"{self.architecture} is a dense family: set n_routed_experts=0")
            e, g = self.n_routed_experts, self.n_group
            need(g >= 1 and e % g == 0, f"n_routed_experts={e} must be divisible by n_group={g}")
            need(g == 1 or e // g >= 2, "group-limited routing needs >= 2 experts per group (group score = top-2 sum)")
            need(1 <= self.topk_group <= g, f"topk_group={self.topk_group} must be in [1, n_group={g}]")
            need(1 <= self.num_experts_per_tok <= self.topk_group * e // g,
                 "num_experts_per_tok must be >= 1 and fit in the experts of the chosen groups")
        if self.architecture == "Qwen3MoeForCausalLM":
            need(self.n_shared_experts == 0 and self.scoring_func == "softmax" and self.qk_norm,
                 "Qwen3MoeForCausalLM has no shared experts, a softmax router and q/k norm")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            need(kind in ("default", "yarn", "llama3"), f"rope_scaling type {kind!r} is not supported "
                 "(default, yarn, llama3)")

    @property
    def use_mla(self):
        return self.kv_lora_rank is not None

    @property
    def gqa_head_dim(self):
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i):
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i not in self.mlp_only_layers


# ----------------------------------------------------------------------------------------------------------------
# norms and rotary embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in at least fp32 whatever the dtype (as HF does), scale in the input dtype
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_parameters(cfg):
    """-> (inv_freq (dim/2,), cos/sin scale, softmax-scale multiplier) for the config's RoPE variant."""
    dim = cfg.qk_rope_head_dim if cfg.use_mla else cfg.gqa_head_dim
    base = cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    rs = dict(cfg.rope_scaling or {})
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0, 1.0
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    if kind == "llama3":
        lo, hi = rs["low_freq_factor"], rs["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / lo, inv_freq / factor, inv_freq)  # long wavelengths: interpolate
        smooth = (orig / wavelen - lo) / (hi - lo)
        medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)  # in between: blend
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        return torch.where(medium, blended, scaled), 1.0, 1.0
    # YaRN: high frequencies extrapolate, low ones interpolate by `factor`, a linear ramp in between
    def mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        attn_factor = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rot):  # the dimension index whose wavelength makes `rot` turns over the original context
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = (inv_freq / factor) * ramp + inv_freq * (1 - ramp)
    # DeepSeek (MLA) also scales the attention logits by mscale(factor, mscale_all_dim)^2
    softmax_mult = mscale(factor, m_all) ** 2 if (cfg.use_mla and m_all) else 1.0
    return inv_freq, attn_factor, softmax_mult


def apply_rope(x, cos, sin, interleave):
    """x (B, H, T, d); cos/sin (B, 1, T, d/2). Rotates pairs (x[2i], x[2i+1]) if interleave, else (x[i], x[i+d/2]).
    The output lists the pair's first members then its second members either way: attention only needs q and k
    rotated the same way, and decode caches keys in this same layout."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# attention


class MLA(nn.Module):
    """Multi-head latent attention. Keys and values come from a small latent c (kv_lora_rank) plus one rotary key
    shared by all heads; the cache stores only those two. Training and prefill run the expanded form (build per-head
    k, v from c); decode runs the absorbed form (fold kv_b_proj into the query and the output), which attends over
    the cached latent directly and never materialises per-head keys."""

    def __init__(self, cfg):
        super().__init__()
        self.h, self.dn, self.dr, self.dv, self.r = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                                     cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
        d, h, dq = cfg.hidden_size, self.h, self.dn + self.dr
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.r + self.dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.r, h * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(h * self.dv, d, bias=cfg.attention_out_bias)
        self.interleave = cfg.rope_interleave
        self.scale = dq ** -0.5 * rope_parameters(cfg)[2]

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.h, self.dn + self.dr).transpose(1, 2)  # (B, H, T, dn+dr)
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, self.interleave)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)  # (B, T, r), (B, T, dr)
        c = self.kv_a_layernorm(c)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin, self.interleave)  # (B, 1, T, dr)
        if cache is None or not cache.has_past:
            if cache is not None:  # prefill: cache the latent, attend in the expanded form
                cache.write(layer, torch.cat((c, k_rope.squeeze(1)), -1))
            kv = self.kv_b_proj(c).view(B, T, self.h, self.dn + self.dv).transpose(1, 2)
            k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # (B, H, T, dn), (B, H, T, dv)
            k = torch.cat((k_nope, k_rope.expand(B, self.h, T, self.dr)), dim=-1)
            out = F.scaled_dot_product_attention(torch.cat((q_nope, q_rope), -1), k, v, is_causal=True,
                                                 scale=self.scale)  # (B, H, T, dv)
        else:
            # absorbed: scores = q_nope.(W_k c) + q_rope.k_rope = [q_nope W_k, q_rope].[c, k_rope]; one key per
            # token shared by all heads, so heads fold into the query rows of two batched matmuls
            kv_all, = cache.write(layer, torch.cat((c, k_rope.squeeze(1)), -1))  # (B, L, r+dr)
            L = kv_all.shape[1]
            w = self.kv_b_proj.weight.view(self.h, self.dn + self.dv, self.r)
            w_k, w_v = w[:, :self.dn], w[:, self.dn:]  # (H, dn, r), (H, dv, r)
            q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_k)
            qq = torch.cat((q_lat, q_rope), -1).reshape(B, self.h * T, self.r + self.dr)
            scores = torch.bmm(qq, kv_all.transpose(1, 2)).view(B, self.h, T, L) * self.scale  # (B, H, T, L)
            scores = scores.masked_fill(~cache.mask, float("-inf"))
            scores = scores.softmax(-1, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)
            o_lat = torch.bmm(scores.view(B, self.h * T, L), kv_all[..., :self.r]).view(B, self.h, T, self.r)
            out = torch.einsum("bhtr,hvr->bhtv", o_lat, w_v)  # (B, H, T, dv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.h * self.dv))


class GQA(nn.Module):
    """Grouped-query attention (Qwen2/Qwen3/Llama): num_key_value_heads key/value heads shared by query groups."""

    def __init__(self, cfg):
        super().__init__()
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, \
            cfg.gqa_head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.kvh * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.kvh * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.hd)
        k = self.k_proj(x).view(B, T, self.kvh, self.hd)
        v = self.v_proj(x).view(B, T, self.kvh, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin, False)  # (B, H, T, hd)
        k = apply_rope(k.transpose(1, 2), cos, sin, False)  # (B, KVH, T, hd)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, enable_gqa=True)
        else:
            k_all, v_all = cache.write(layer, k.transpose(1, 2), v)  # (B, L, KVH, hd) each
            out = F.scaled_dot_product_attention(q, k_all.transpose(1, 2), v_all.transpose(1, 2),
                                                 attn_mask=cache.mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.h * self.hd))


# ----------------------------------------------------------------------------------------------------------------
# MLP and mixture of experts


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Scores every expert, picks num_experts_per_tok of them per token, returns their ids and gate weights.
    The correction bias (aux-loss-free balancing) only changes WHICH experts win; the gate weights come from the
    unbiased scores. Scores are computed in fp32, as the checkpoints' reference code does."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """model.to(bf16) must not touch the bias's values: a bf16 round trip moves them by up to ~7e-3, enough to
        flip near-tied experts. Device moves apply; a cast to a low-precision dtype does not (fp32 stays fp32,
        and an fp64 model's bias may be fp64)."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved.dtype not in (torch.float32, torch.float64):
            self.e_score_correction_bias = bias.to(device=moved.device)  # the original values, on the new device
        return self

    def scores(self, x):  # x (N, D) -> (N, E) in fp32 (fp64 for an fp64 model), autocast or not
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this in bf16: near-ties flip (M6)
            logits = F.linear(x.to(dt), self.weight.to(dt))
            return logits.sigmoid() if self.cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x):
        cfg, k = self.cfg, self.cfg.num_experts_per_tok
        scores = self.scores(x)  # (N, E)
        choice = scores + self.e_score_correction_bias
        if cfg.n_group > 1:  # keep only the experts of each token's topk_group best groups (score = top-2 sum)
            N, E = choice.shape
            grouped = choice.view(N, cfg.n_group, E // cfg.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, n_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, stable_topk(group_scores, cfg.topk_group), True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)
        idx = stable_topk(choice, k)  # (N, K)
        return idx, self.gate_weights(scores, idx), scores

    def gate_weights(self, scores, idx):
        """The gate weights of the experts idx (N, K): their unbiased scores (N, E), renormalised to sum to 1 when
        norm_topk_prob, times routed_scaling_factor. Routing replay recomputes them for the replayed experts."""
        w = scores.gather(1, idx)  # (N, K)
        if self.cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.cfg.routed_scaling_factor


def stable_topk(x, k):
    """Indices of the k largest entries per row; ties go to the lower index, always (torch.topk does not promise
    an order for ties, and sampler and trainer must route a token to the same experts)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def grouped_mm_ok(x, d_in, d_out):
    """torch._grouped_mm needs fp32/bf16/fp16 and 16-byte aligned rows; on CUDA, bf16 on Hopper or newer."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if (d_in * x.element_size()) % 16 or (d_out * x.element_size()) % 16:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu"


class Experts(nn.Module):
    """Routed experts, weights stacked over experts: gate/up (E, I, D), down (E, D, I)."""

    def __init__(self, cfg):
        super().__init__()
        E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x, idx, w, use_grouped_mm=True):
        """x (N, D), idx/w (N, K) -> (N, D). Sort the N*K (token, expert) pairs by expert so each expert sees one
        contiguous block of rows, run one grouped matmul per projection, then put rows back and sum over K."""
        N, K = idx.shape
        E, I = self.gate_proj.shape[:2]
        order = torch.argsort(idx.reshape(-1), stable=True)  # (N*K,) pair positions sorted by expert
        xs = x[order // K]  # (N*K, D) the token of each pair
        counts = torch.bincount(idx.reshape(-1), minlength=E)  # (E,) rows per expert
        if use_grouped_mm and grouped_mm_ok(x, x.shape[1], I):
            offs = counts.cumsum(0).to(torch.int32)  # cumulative row ends, as _grouped_mm wants
            h = F.silu(torch._grouped_mm(xs, self.gate_proj.transpose(1, 2), offs=offs)) * \
                torch._grouped_mm(xs, self.up_proj.transpose(1, 2), offs=offs)  # (N*K, I)
            ys = torch._grouped_mm(h, self.down_proj.transpose(1, 2), offs=offs)  # (N*K, D)
        else:  # fp64 or odd widths: one plain matmul per expert with rows
            chunks = []
            for e, xe in enumerate(xs.split(counts.tolist())):
                if xe.shape[0]:
                    chunks.append(F.linear(F.silu(F.linear(xe, self.gate_proj[e])) * F.linear(xe, self.up_proj[e]),
                                           self.down_proj[e]))
            ys = torch.cat(chunks) if chunks else xs.new_zeros(0, x.shape[1])
        ys = ys * w.reshape(-1)[order].unsqueeze(1).to(ys.dtype)
        # undo the sort with an inverse permutation (deterministic, unlike index_add_'s atomics on CUDA)
        out = torch.empty_like(ys)
        out[order] = ys
        return out.view(N, K, -1).sum(1)


class MoE(nn.Module):
    """Shared experts (always on) + routed experts; counts tokens per expert in training (optim.pop_expert_loads)."""

    def __init__(self, cfg, j=0):
        super().__init__()
        self.cfg, self.j = cfg, j  # j: this layer's index among the MoE layers (its slot in a routes tensor)
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts > 0 else None
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)  # tokens per expert
        self.aux_loss = self.routes = None  # routes (B, T, K): the last forward's experts (the sampler reads them)

    def forward(self, x, valid=None, routes=None):
        """x (B, T, D); valid (B, T) bool marks real tokens (not padding): only they count toward expert loads
        and the balance loss, so neither depends on how a batch is padded or split. routes (B, T, n_moe_layers, K):
        use these experts instead of routing (routing replay: the sampler's), with gate weights recomputed for them."""
        B, T, D = x.shape
        xf = x.reshape(-1, D)
        idx, w, scores = self.gate(xf)
        if routes is not None:
            idx = routes[:, :, self.j].reshape(B * T, -1)
            w = self.gate.gate_weights(scores, idx)
        self.routes = idx.detach().reshape(B, T, -1)  # (B, T, K)
        y = self.experts(xf, idx, w).view(B, T, D)
        y = y if self.shared_experts is None else y + self.shared_experts(x)
        if self.training and torch.is_grad_enabled():  # training forwards only (not old/ref log-prob passes)
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if valid is None else valid
            with torch.no_grad():
                real = self.routes[valid].reshape(-1)
                self.load += torch.bincount(real, minlength=self.load.numel()).to(self.load.dtype)
            self.aux_loss = self.balance_loss(xf, idx, valid) if self.cfg.aux_loss_alpha > 0 else None
        return y

    def balance_loss(self, xf, idx, valid):
        """DeepSeek-V3's sequence-wise balance loss alpha * sum_i f_i P_i, averaged over sequences (rows), over
        each row's real tokens. f_i: the fraction of those tokens sent to expert i (times E/K, so uniform = 1);
        P_i: their mean normalised score. The scores see a detached input, so the loss shapes the router weights
        and nothing upstream."""
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        B, T = valid.shape
        v = valid.unsqueeze(-1).float()  # (B, T, 1)
        n = v.sum(1).clamp(min=1)  # (B, 1) real tokens per row
        s = self.gate.scores(xf.detach())  # (N, E)
        p = ((s / s.sum(-1, keepdim=True)).view(B, T, E) * v).sum(1) / n  # (B, E)
        hits = F.one_hot(idx, E).sum(1).view(B, T, E).float()  # (B, T, E)
        f = (hits * v).sum(1) / n * E / K  # (B, E)
        return self.cfg.aux_loss_alpha * (f * p).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------------
# the transformer


class Block(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.use_mla else GQA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe_j = sum(cfg.is_moe_layer(j) for j in range(i))  # this layer's slot among the MoE layers
        self.mlp = MoE(cfg, moe_j) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.i = i

    def forward(self, x, cos, sin, cache=None, valid=None, routes=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.i)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, valid, routes) if isinstance(self.mlp, MoE) else self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # a plain fp32 attribute, not a buffer: model.to(bf16) would round it (an angle error of radians by 4k tokens)
        self.inv_freq, self.rope_scale, _ = rope_parameters(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, initializer_range) weights; output projections scaled by 1/sqrt(2 * layers) (GPT-2) so the
        residual stream does not grow with depth; norms 1, biases and the router correction bias 0."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                out = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                p.normal_(0.0, std / math.sqrt(2 * self.config.num_hidden_layers) if out else std)
        for m in self.modules():
            if isinstance(m, Router):
                m.e_score_correction_bias.zero_()

    def forward(self, tokens, cache=None, n_new=None, return_hidden=False, valid=None, routes=None):
        """tokens (B, T) -> logits (B, T, V), or the final-normed hidden states (B, T, D) with return_hidden.
        Without a cache: a causal forward over whole sequences at positions 0..T-1 (training, scoring). Right
        padding is harmless to attention: padded positions come after every real token; valid (B, T) marks the real
        ones for the MoE statistics. With a cache (rollout.KVCache): the T tokens of each row continue that row;
        n_new (B,) says how many are real (default all T). routes: routing replay (MoE.forward; moe_routes())."""
        B, T = tokens.shape
        positions = cache.begin(T) if cache is not None else torch.arange(T, device=tokens.device).expand(B, T)
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # (B, T, d/2)
        cos = (freqs.cos() * self.rope_scale).unsqueeze(1)  # (B, 1, T, d/2)
        sin = (freqs.sin() * self.rope_scale).unsqueeze(1)
        x = self.embed_tokens(tokens)  # (B, T, D)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, valid, routes)
        if cache is not None:
            cache.advance(T if n_new is None else n_new)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def logprobs(self, tokens, rows, cols, targets, temperature=1.0, vocab=None, return_entropy=False, valid=None,
                 routes=None):
        """The training path: log p(targets) (N,) read off the hidden states at (rows, cols) of a causal forward
        over tokens (B, T), with the LM head fused into kernels.token_logprobs (no (N, V) logits kept). vocab:
        score over the first `vocab` ids only (the tokenizer's; a padded LM head's extra rows get no mass). A
        method of the model, not a caller's use of lm_head.weight, so FSDP unshards the head for it."""
        h = self.forward(tokens, return_hidden=True, valid=valid, routes=routes)  # (B, T, D)
        w = self.lm_head.weight if vocab is None else self.lm_head.weight[:vocab]
        with torch.autocast(h.device.type, enabled=False):  # the kernel accumulates logits in fp32 itself (M8)
            return kernels.token_logprobs(h[rows, cols], w, targets, temperature, return_entropy=return_entropy)

    def moe_layers(self):
        return [l.mlp for l in self.layers if isinstance(l.mlp, MoE)]

    def moe_routes(self):  # (B, T, n_moe_layers, K): the experts every MoE layer used in the last forward
        return torch.stack([m.routes for m in self.moe_layers()], 2)

    def aux_loss(self):
        """Sum of the balance losses of the last training forward (0 when alpha = 0)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return sum(losses) if losses else torch.zeros((), device=self.lm_head.weight.device)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
