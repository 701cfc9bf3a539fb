"""A naive, readable batched sampler with a preallocated KV cache: G completions for each of many prompts.

    out = generate(model, prompts, max_new_tokens=128, temperature=1.0, num_samples=G, stop_ids=[eot], seed=0)
    out.tokens[i], out.logprobs[i], out.truncated[i]   # row i belongs to prompt i // G

How it works:
1. Prefill: all prompts in one right-padded forward; each row's cache holds its own prompt (per-row lengths, the
   position of a token is its cache slot, so padding never reaches attention or RoPE). The logits at each prompt's
   last real token give the first next-token distribution.
2. Replicate: the P prefilled rows are copied to P*G rows (one prefill per prompt, not per sample); every row then
   samples its own first token.
3. Decode: one token per row per step. A row stops when it samples a stop id or its text ends with a stop string
   (the stop token is kept: the trainer must learn to emit it), or after max_new_tokens (truncated). Finished rows
   leave the batch when enough of them have piled up (the cache is compacted).

The log-prob returned for each sampled token is log_softmax(logits / temperature) over the full valid vocabulary,
before top-k/top-p filtering: exactly what the trainer computes for the same token at the same temperature
(PITFALLS P2; with top_p < 1 or top_k > 0 the sampled distribution is narrower than this, so on-policy training
should keep both off). At temperature 0 (greedy) the log-probs are at temperature 1.
"""
import dataclasses
import time
from dataclasses import dataclass, field

import torch


class KVCache:
    """Preallocated per-layer cache for `rows` sequences of up to `max_len` tokens.

    Row b holds its tokens in slots 0..lengths[b]-1 and its next token goes to slot lengths[b], so a token's slot is
    its position: no left padding, nothing to mask but the future. A forward over T new tokens per row writes slots
    lengths[b]..lengths[b]+T-1; rows that had fewer real tokens (a ragged prefill) advance by `n_new[b]` only and
    their padded slots are overwritten later. MLA caches the normalised latent and the shared rotary key
    (kv_lora_rank + qk_rope_head_dim numbers per token and layer); GQA caches k and v per kv head.
    """

    def __init__(self, cfg, rows, max_len, device=None, dtype=torch.float32):
        self.max_len = max_len
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        if cfg.use_mla:  # latent and rope key side by side: attention reads them as one (B, L, r+dr) key
            shapes = [(rows, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim)]
        else:
            kvh = cfg.num_key_value_heads or cfg.num_attention_heads
            shapes = [(rows, max_len, kvh, cfg.gqa_head_dim)] * 2
        self.layers = [[torch.zeros(s, device=device, dtype=dtype) for s in shapes]
                       for _ in range(cfg.num_hidden_layers)]
        self.has_past = False
        self.positions = self.mask = None
        self.span = 0

    def begin(self, T):
        """Set up one forward over T new tokens per row: positions (B, T), the attention mask over the filled span."""
        self.has_past = bool(self.lengths.max() > 0)
        self.positions = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        self.span = int(self.positions.max()) + 1
        if self.span > self.max_len:
            raise ValueError(f"KVCache: position {self.span - 1} does not fit max_len={self.max_len}")
        slots = torch.arange(self.span, device=self.lengths.device)
        self.mask = (slots[None, None, :] <= self.positions[:, :, None]).unsqueeze(1)  # (B, 1, T, span)
        return self.positions

    def write(self, layer, *new):
        """Store each (B, T, ...) tensor at the rows' slots; return the (B, span, ...) views to attend over."""
        rows = torch.arange(self.positions.shape[0], device=self.positions.device)[:, None]
        out = []
        for buf, val in zip(self.layers[layer], new):
            buf[rows, self.positions] = val.to(buf.dtype)
            out.append(buf[:, :self.span])
        return out

    def advance(self, n_new):
        self.lengths += n_new

    def select(self, index):
        """Keep/replicate rows: index (R,) of old rows. Used to copy one prefill to G samples and to compact."""
        self.lengths = self.lengths[index]
        self.layers = [[buf[index] for buf in bufs] for bufs in self.layers]


@dataclass
class Rollout:
    tokens: list           # R lists of sampled ids (the stop token included when there is one)
    logprobs: list         # R lists of the sampler's log-prob of each sampled id
    truncated: list        # R bools: True when the row hit max_new_tokens without a stop
    num_samples: int       # G: row i belongs to prompt i // G
    stop_reason: list = field(default_factory=list)  # "stop_id" | "stop_string" | "length"
    experts: list = None   # record_experts: per row, the expert ids of every token fed to the model in each MoE
    #                        layer: (len(prompt) + len(completion) - 1, n_moe_layers, K); the last sampled token is
    #                        never fed
    seconds: float = 0.0
    new_tokens: int = 0    # sampled tokens in total (for tokens/s)


def sample_next(logits, temperature, top_p, top_k, generator):
    """logits (R, V) fp32 over the valid ids -> (ids (R,), logprobs (R,) of those ids at `temperature`).
    generator: a torch.Generator for the batch's uniforms, or the uniforms themselves, (R,) in [0, 1)."""
    if temperature == 0:
        ids = logits.argmax(-1)
        return ids, torch.log_softmax(logits, -1).gather(1, ids[:, None]).squeeze(1)
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, -1)  # (R, V) the full-vocabulary distribution the trainer will see
    filt = scaled
    if top_k > 0 and top_k < filt.shape[-1]:
        kth = filt.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        filt = filt.masked_fill(filt < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = filt.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        filt = filt.masked_fill(drop, float("-inf"))
    # inverse-CDF sampling: one uniform per row (torch.multinomial draws V exponentials per row, far slower);
    # u is scaled by the row's total so rounding in the cumsum can never select a zero-probability id
    cdf = filt.softmax(-1).cumsum(-1)  # (R, V)
    if isinstance(generator, torch.Tensor):
        u = generator[:, None]
    else:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
    u = u * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)  # (R,)
    return ids, logp.gather(1, ids[:, None]).squeeze(1)


def stop_ids_for(model, tok):
    """Generation stops at the tokenizer's end-of-text and at every EOS id the model's config names inside the
    tokenizer's vocabulary (Qwen3 names two: PITFALLS P4)."""
    eos = model.config.eos_token_id
    return sorted({tok.eot_id} | {i for i in (eos if isinstance(eos, list) else [eos])
                                  if i is not None and i < tok.vocab_size})


def completion_texts(tok, out, stop_ids):
    """The completions of a Rollout as the rewards read them, in grpo.py and eval.py alike: decoded without the stop
    id that ended them (out.tokens keeps it: the trainer learns to emit it)."""
    return [tok.decode([t for t in ids if t not in stop_ids]) for ids in out.tokens]


def head_logits(h, w_head, V):
    """Final hidden states h (B, D) -> fp32 logits (B, V) over the first V ids, the matmul in w_head's dtype (fp32
    or fp64) with autocast off."""
    with torch.autocast(h.device.type, enabled=False):
        return (h.to(w_head.dtype) @ w_head.T)[:, :V].float()


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=1, stop_ids=(),
             stop_strings=(), decode=None, vocab_size=None, seed=0, generator=None, record_experts=False,
             compact_fraction=0.25, prompt_batch=0, row_seeds=None):
    """Sample `num_samples` completions for each prompt (a list of token-id lists). See the module docstring.

    decode: ids -> str, needed for stop_strings. vocab_size: ids >= this are never sampled (a padded LM head);
    default the model's vocab. generator: a torch.Generator (default: one seeded with `seed`, on the model's device).
    compact_fraction: drop finished rows from the batch once they are this fraction of it.
    prompt_batch: sample at most this many prompts (prompt_batch * G rows) at a time, one after another with the
    same generator; the KV cache holds only those rows (0 = all at once). Greedy results do not depend on it.
    row_seeds: R ints, one random stream per output row, used instead of `generator`/`seed`: a row's sample then
    depends only on its prompt and its seed, not on which other prompts share the batch (eval.py uses this so
    results do not change with --batch-prompts or the number of ranks). Exactly so where the kernels do not depend
    on the batch shape (CPU fp32, tested); GPU and bf16 kernels can differ in the last bits with batch size.
    Under FSDP call it inside `dist.gathered(model)`: the weights stay unsharded for the whole call.
    """
    t0 = time.perf_counter()
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    V = cfg.vocab_size if vocab_size is None else vocab_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if any(min(p) < 0 or max(p) >= V for p in prompts):
        raise ValueError(f"generate: prompt ids must be in [0, {V})")
    if max_new_tokens < 1 or num_samples < 1 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("generate: need max_new_tokens >= 1, num_samples >= 1, temperature >= 0, 0 < top_p <= 1, "
                         "top_k >= 0")
    if stop_strings and decode is None:
        raise ValueError("generate: stop_strings need a decode function")
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if row_seeds is not None and len(row_seeds) != len(prompts) * num_samples:
        raise ValueError(f"generate: {len(row_seeds)} row_seeds for {len(prompts) * num_samples} rows")
    if 0 < prompt_batch < len(prompts):
        G = num_samples
        parts = [generate(model, prompts[i:i + prompt_batch], max_new_tokens, temperature, top_p, top_k, G,
                          stop_ids, stop_strings, decode, vocab_size, generator=generator,
                          record_experts=record_experts, compact_fraction=compact_fraction,
                          row_seeds=row_seeds[i * G:(i + prompt_batch) * G] if row_seeds is not None else None)
                 for i in range(0, len(prompts), prompt_batch)]
        return Rollout(**{f: sum((getattr(p, f) for p in parts), []) for f in ("tokens", "logprobs", "truncated",
                                                                               "stop_reason")},
                       experts=None if parts[0].experts is None else [e for p in parts for e in p.experts],
                       num_samples=num_samples, seconds=time.perf_counter() - t0,
                       new_tokens=sum(p.new_tokens for p in parts))
    was_training = model.training
    model.eval()
    record = record_experts and bool(model.moe_layers())

    P, G = len(prompts), num_samples
    R = P * G
    row_gens = None if row_seeds is None else [torch.Generator(device=device).manual_seed(int(s)) for s in row_seeds]
    ahead = 256  # with row_seeds: each row's next uniforms, drawn from its own stream this many steps at a time
    lens = torch.tensor([len(p) for p in prompts], device=device)
    Tp = int(lens.max())
    batch = torch.zeros(P, Tp, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        batch[i, :len(p)] = torch.tensor(p, device=device)
    # The LM head's matmul in fp32 (fp64 for an fp64 model) whatever the model's dtype (PITFALLS M8): logits
    # rounded to bf16 put ~1e-3 errors into the sampler's log-probs, while the trainer's kernel accumulates in fp32.
    # An fp32 head is used as it is (no copy); a bf16 one (FSDP mixed precision) is upcast once per call: V x D x 4
    # bytes (3.7 GB for DeepSeek-V3's head), held while sampling. Columns >= V (a padded head) are never sampled.
    w = model.lm_head.weight
    cdt = torch.promote_types(w.dtype, torch.float32)
    w_head = w if w.dtype == cdt else w[:V].to(cdt)  # (V_padded or V, D)
    head = lambda h: head_logits(h, w_head, V)  # noqa: E731

    cache = KVCache(cfg, P, Tp + max_new_tokens, device=device, dtype=dtype)
    h = model(batch, cache, n_new=lens, return_hidden=True)  # (P, Tp, D)
    logits = head(h[torch.arange(P, device=device), lens - 1])  # (P, V) at each prompt's last real token
    prefill_routes = model.moe_routes() if record else None  # (P, Tp, n_moe, K)
    rows = torch.arange(P, device=device).repeat_interleave(G)  # batch position -> prompt, then -> output row
    cache.select(rows)
    logits = logits[rows]
    rows = torch.arange(R, device=device)  # batch position -> output row

    tokens = [[] for _ in range(R)]
    logps = [[] for _ in range(R)]
    reason = ["length"] * R
    routes = [[] for _ in range(R)]  # per row, the (n_moe, K) experts of each fed-back token
    stop_set = set(stop_ids)
    max_stop = max((len(s.encode()) for s in stop_strings), default=0)
    alive = torch.ones(R, dtype=torch.bool, device=device)  # per batch position
    for step in range(max_new_tokens):
        rows_l = rows.tolist()
        if row_gens is not None and step % ahead == 0:  # R small launches per `ahead` steps, not per step
            uniforms = torch.stack([torch.rand(ahead, generator=g, device=device) for g in row_gens])  # (R, ahead)
        ids, lp = sample_next(logits, temperature, top_p, top_k,
                              generator if row_gens is None else uniforms[rows, step % ahead])
        ids_l, lp_l, alive_l = ids.tolist(), lp.tolist(), alive.tolist()
        for b, r in enumerate(rows_l):
            if not alive_l[b]:
                continue
            tokens[r].append(ids_l[b])
            logps[r].append(lp_l[b])
            if ids_l[b] in stop_set:
                reason[r], alive_l[b] = "stop_id", False
            elif max_stop:  # a stop string completed by this token lies within the last max_stop tokens
                tail = decode(tokens[r][-max_stop:])
                if any(s in tail for s in stop_strings):
                    reason[r], alive_l[b] = "stop_string", False
        alive = torch.tensor(alive_l, device=device)
        if step == max_new_tokens - 1 or not alive.any():
            break
        if (~alive).sum() >= compact_fraction * len(rows_l):  # compact: keep only unfinished rows
            keep = alive.nonzero().squeeze(1)
            cache.select(keep)
            rows, ids, alive = rows[keep], ids[keep], alive[keep]
        logits = head(model(ids[:, None], cache, return_hidden=True)[:, 0])  # (B, V)
        if record:
            step_routes = model.moe_routes()[:, 0]  # (B, n_moe, K) the experts of the token just fed in
            for b, (r, a) in enumerate(zip(rows.tolist(), alive.tolist())):
                if a:
                    routes[r].append(step_routes[b])
    model.train(was_training)

    experts = None
    if record:  # per row: the prompt's routes (from the shared prefill), then those of the fed-back tokens
        experts = []
        for r in range(R):
            pr = prefill_routes[r // G, :len(prompts[r // G])]  # (len(prompt), n_moe, K)
            experts.append(torch.cat([pr] + [x[None] for x in routes[r]]))
    return Rollout(tokens=tokens, logprobs=logps, truncated=[x == "length" for x in reason], num_samples=G,
                   stop_reason=reason, experts=experts, seconds=time.perf_counter() - t0,
                   new_tokens=sum(len(t) for t in tokens))


# ----------------------------------------------------------------------------------------------------------------
# a rollout as tensors, for the trainer


@dataclass
class Batch:
    """B outputs as tensors (in a rollout, row i belongs to prompt i // G). A mini-batch is batch[indices]."""
    tokens: torch.Tensor        # (B, T) prompt + completion, right-padded with 0
    prompt_len: torch.Tensor    # (B,)
    comp_len: torch.Tensor      # (B,) completion tokens, the stop token included
    adv: torch.Tensor           # (B,) fp32 advantage of each output
    keep: torch.Tensor          # (B,) bool: in the loss (--mask-truncated drops the truncated outputs)
    sampler_logp: torch.Tensor  # (B, C) the sampler's log-prob of each completion token (0 past comp_len)
    old_logp: torch.Tensor = None  # (B, C) pi_old, when updates are not exactly on-policy
    routes: torch.Tensor = None    # (B, T, n_moe_layers, K) the sampler's experts, for routing replay
    scores: torch.Tensor = None    # (B, 4) float64 reward, accuracy, format, language (nan: not scored)
    truncated: torch.Tensor = None  # (B,) bool: hit max_new_tokens
    texts: list = None             # decoded completions, for the log

    def __getitem__(self, i):
        pick = lambda v: v[i] if torch.is_tensor(v) else [v[j] for j in i.tolist()] if v else v  # noqa: E731
        return Batch(**{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})


def make_batch(prompts, completions, sampler_logp, adv, keep=None, experts=None, scores=None, truncated=None,
               texts=None):
    """Per-output lists, as the sampler returns them -> a Batch. experts: per output (P + L - 1, n_moe, K)."""
    P, L = torch.tensor([len(p) for p in prompts]), torch.tensor([len(x) for x in completions])
    tokens, lp = torch.zeros(len(P), int((P + L).max()), dtype=torch.long), torch.zeros(len(P), int(L.max()))
    for b, (p, x, s) in enumerate(zip(prompts, completions, sampler_logp)):
        tokens[b, :len(p) + len(x)] = torch.tensor(p + x)
        lp[b, :len(x)] = torch.tensor(s)
    routes = None
    if experts:  # padding positions route to experts 0..K-1 (their outputs are never used)
        routes = torch.arange(experts[0].shape[-1]).expand(*tokens.shape, *experts[0].shape[1:]).clone()
        for b, e in enumerate(experts):
            routes[b, :len(e)] = e
    return Batch(tokens, P, L, torch.as_tensor(adv, dtype=torch.float32),
                 torch.ones(len(P), dtype=torch.bool) if keep is None else torch.as_tensor(keep), lp, routes=routes,
                 scores=None if scores is None else torch.tensor(scores, dtype=torch.float64),
                 truncated=torch.zeros(len(P), dtype=torch.bool) if truncated is None else torch.as_tensor(truncated),
                 texts=texts)


def pack(b):
    """The forward's inputs: x (B, T) = prompt + completion minus its last token, padded with 0, and valid (B, T)
    its real positions (by position, never by token id: P3); and, flat over the completion tokens (row-major),
    each token's row, its index t in the completion and the input position P - 1 + t whose hidden state predicts
    it (PITFALLS P1)."""
    n = b.prompt_len + b.comp_len - 1  # (B,) input tokens per row
    valid = torch.arange(int(n.max())) < n[:, None]  # (B, T)
    x = torch.where(valid, b.tokens[:, :valid.shape[1]], 0)
    rows, t = (torch.arange(b.sampler_logp.shape[1]) < b.comp_len[:, None]).nonzero(as_tuple=True)  # (N,) each
    return x, valid, rows, t, b.prompt_len[rows] - 1 + t
