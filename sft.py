"""Next-token training: the toy base model's pretraining, cold start, rejection-sampling SFT, distillation.

    python sft.py --data=out/toy/corpus.txt --tokenizer=out/toy/tokenizer.bpe --out-dir=out/base --max-steps=2000
    python sft.py --data=sft.jsonl --init-from=out/base --tokenizer=out/toy/tokenizer.bpe --out-dir=out/cold
    torchrun --standalone --nproc_per_node=8 sft.py --data=sft.jsonl --init-from=/path/to/hf_model ...

Two kinds of data, by file extension:
  .txt    raw text; documents separated by the tokenizer's end-of-text token written as text (<|endoftext|>).
          Training windows of seq_len tokens are cut at random offsets; the loss is on every token.
  .jsonl  one {"prompt": ..., "completion": ...} object per line (field names are flags). The model sees
          prompt + completion + end-of-text; the loss is on the completion and the end-of-text token only.
A run writes out_dir/config.json, metrics.jsonl (train and held-out loss), ckpt_*.pt (model, optimizer, RNG,
step; atomic, the newest keep_last kept) and, at the end, final/ (a Hugging Face directory) plus the tokenizer.
`--resume` continues from the newest checkpoint in out_dir; batches are drawn from a generator seeded by
(seed, step), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

import checkpoint
import config
import data
import dist
import metrics
import optim
from data import DataError, Tokenizer
from dist import print0
from model import ModelConfig, Transformer


@dataclass
class SFTConfig:
    """nano-r1 sft.py settings"""
    out_dir: str = "out/sft"
    data: str = ""                 # .txt (raw text) or .jsonl (prompt/completion); required
    val_data: str = ""             # held-out file of the same kind; default: the last val_frac of data
    val_frac: float = 0.02
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    tokenizer: str = ""            # tokenizer file (data.Tokenizer.from_file); required
    init_from: str = ""            # "" = a new model from the settings below; else a checkpoint, run dir or HF dir
    resume: bool = False           # continue from the newest checkpoint in out_dir
    # a new model (ignored with init_from): DeepSeek-V3 layout, MLA + MoE
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    intermediate_size: int = 384
    n_routed_experts: int = 8      # 0: a dense model
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.0    # sequence-wise balance loss (V3 uses a tiny one; 0 = off)
    bias_update_rate: float = 1e-3  # aux-loss-free balancing gamma (0 = off)
    tie_word_embeddings: bool = False
    # optimisation
    seq_len: int = 128
    batch_size: int = 32           # sequences per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_frac: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 2
    max_bad_steps: int = 5         # stop after this many non-finite steps in a row
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"            # auto: bf16 on a capable GPU, else fp32
    threads: int = 0               # torch threads per process (0: all cores / local ranks)
    wandb_project: str = ""        # "" = off
    wandb_mode: str = "online"


def check_config(c):
    need = config.need
    need(c.data, "data", "a training file is required (.txt or .jsonl)")
    need(os.path.isfile(c.data), "data", f"{c.data}: no such file")
    need(c.data.endswith((".txt", ".jsonl")), "data", f"{c.data}: expected a .txt or .jsonl file")
    need(not c.val_data or os.path.isfile(c.val_data), "val-data", f"{c.val_data}: no such file")
    need(c.tokenizer and os.path.isfile(c.tokenizer), "tokenizer", f"{c.tokenizer!r}: a tokenizer file is required")
    for flag in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "ckpt_every"):
        need(getattr(c, flag) >= 1, flag.replace("_", "-"), "must be >= 1")
    need(c.lr > 0, "lr", "must be > 0")
    need(0 <= c.val_frac < 1, "val-frac", "must be in [0, 1)")


# ----------------------------------------------------------------------------------------------------------------
# data


def load_text(path, tok):
    with open(path, encoding="utf-8") as f:
        ids = np.array(tok.encode(f.read()), dtype=np.int64)
    if len(ids) < 2:
        raise DataError(f"{path}: fewer than 2 tokens")
    return ids


def load_pairs(path, tok, c):
    rows = []
    for loc, obj in data.read_rows(path):
        for fld in (c.prompt_field, c.completion_field):
            if not isinstance(obj.get(fld), str):
                raise DataError(f"{loc}: field {fld!r} missing or not a string")
        # the prompt as grpo.py and eval.py encode it (BOS included where the tokenizer adds one)
        p, comp = data.prompt_ids(tok, obj[c.prompt_field]), tok.encode(obj[c.completion_field]) + [tok.eot_id]
        if not p:  # the first completion token needs a position before it to be predicted from
            raise DataError(f"{loc}: field {c.prompt_field!r} is empty")
        rows.append((p, comp))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def text_batch(ids, n, T, rng):
    """n random windows: inputs (n, T), targets (n, T) shifted by one, loss on every position (all real)."""
    starts = rng.integers(0, len(ids) - T - 1, size=n) if len(ids) > T + 1 else np.zeros(n, dtype=np.int64)
    T = min(T, len(ids) - 1)
    x = np.stack([ids[s:s + T] for s in starts])
    y = np.stack([ids[s + 1:s + T + 1] for s in starts])
    ones = torch.ones(n, T, dtype=torch.bool)
    return torch.from_numpy(x), torch.from_numpy(y), ones, ones


def pair_batch(rows, n, T, rng):
    """n random prompt/completion rows, right-padded: the mask keeps the positions whose target is a completion
    token (position t predicts token t+1), built from lengths, never from token values (PITFALLS P3)."""
    pick = rng.integers(0, len(rows), size=n)
    seqs = [(rows[i][0] + rows[i][1])[:T + 1] for i in pick]
    L = max(len(s) for s in seqs) - 1
    x = torch.zeros(n, L, dtype=torch.long)
    y = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.bool)  # positions whose target is in the loss
    valid = torch.zeros(n, L, dtype=torch.bool)  # real (not padding) positions, for the MoE statistics
    for b, (i, s) in enumerate(zip(pick, seqs)):
        x[b, :len(s) - 1] = torch.tensor(s[:-1])
        y[b, :len(s) - 1] = torch.tensor(s[1:])
        mask[b, len(rows[i][0]) - 1:len(s) - 1] = True  # targets from the first completion token on
        valid[b, :len(s) - 1] = True
    return x, y, mask, valid


def token_loss_sum(model, x, y, mask, valid, vocab):
    """Sum of -log p(target) over masked positions, through the fused LM-head log-prob (no (N, V) logits kept)."""
    rows, cols = mask.nonzero(as_tuple=True)
    logp = model.logprobs(x, rows, cols, y[rows, cols], vocab=vocab, valid=valid)  # (N,)
    return -logp.sum(), int(mask.sum())


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    c = config.parse_config(SFTConfig, argv)
    check_config(c)
    device, dtype = dist.start(c)
    tok = Tokenizer.from_file(c.tokenizer)
    vocab = tok.vocab_size
    R, W = dist.rank(), dist.world_size()
    state = checkpoint.resume_state(c)
    if state or c.init_from:  # on resume the weights come with restore_checkpoint below
        model = checkpoint.build_model(c.init_from, state, device, dtype)
    else:
        mc = ModelConfig(vocab_size=64 * math.ceil(vocab / 64),  # a padded LM head; ids >= vocab never used
                         **{f.name: getattr(c, f.name) for f in dataclasses.fields(ModelConfig)
                            if hasattr(c, f.name) and f.name != "vocab_size"},
                         eos_token_id=tok.eot_id)
        model = dist.shard_model(Transformer(mc).to(device=device), dtype == torch.bfloat16)
    model.train()
    checkpoint.check_vocab(model, tok)
    opt = optim.adamw(model, c.lr, c.weight_decay, (c.beta1, c.beta2))
    start_step = 0
    if state:
        checkpoint.restore_checkpoint(state, {"model": model}, opt)
        dist.set_rng_state(state["rng"])
        start_step = state["step"]

    if c.data.endswith(".txt"):
        ids = load_text(c.data, tok)
        val = load_text(c.val_data, tok) if c.val_data else None
        if val is None and c.val_frac > 0:
            cut = int(len(ids) * (1 - c.val_frac))
            ids, val = ids[:cut], ids[cut:]
        batch = lambda rng, n: text_batch(ids, n, c.seq_len, rng)  # noqa: E731
        val_batch = (lambda rng, n: text_batch(val, n, c.seq_len, rng)) if val is not None else None  # noqa: E731
        print0(f"{c.data}: {len(ids):,} training tokens" + (f", {len(val):,} held-out" if val is not None else ""))
    else:
        rows = load_pairs(c.data, tok, c)
        val = load_pairs(c.val_data, tok, c) if c.val_data else None
        if val is None and c.val_frac > 0 and len(rows) >= 2:
            cut = max(1, int(len(rows) * (1 - c.val_frac)))
            rows, val = rows[:cut], rows[cut:] or None
        batch = lambda rng, n: pair_batch(rows, n, c.seq_len, rng)  # noqa: E731
        val_batch = (lambda rng, n: pair_batch(val, n, c.seq_len, rng)) if val else None  # noqa: E731
        print0(f"{c.data}: {len(rows):,} prompt/completion pairs" + (f", {len(val):,} held-out" if val else ""))

    def my_share(xym):
        """This rank's rows of a global batch: every rank draws the same W * batch_size rows, keeps its slice,
        so W ranks see exactly the batch one process with W times the batch size would."""
        return tuple(t[R * c.batch_size:(R + 1) * c.batch_size].to(device) for t in xym)

    checkpoint.write_run_config(c)
    log = metrics.MetricsLogger(c.out_dir, c, c.wandb_project, c.wandb_mode)
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters ({model.config.architecture}, "
           f"{model.config.n_routed_experts} routed experts), {device}, {dtype}, {W} process(es)")

    @torch.no_grad()
    def evaluate():
        if val_batch is None:
            return None
        model.eval()
        rng = np.random.default_rng(c.seed + 1)  # the same held-out windows every time
        tot, n = 0.0, 0
        for _ in range(c.eval_batches):
            x, y, m, v = my_share(val_batch(rng, c.batch_size * W))
            with dist.autocast(device, dtype):
                s, k = token_loss_sum(model, x, y, m, v, vocab)
            tot, n = tot + s.item(), n + k
        model.train()
        return dist.all_reduce_sum(tot) / max(dist.all_reduce_sum(n), 1)

    t0, tokens_seen, bad = time.perf_counter(), 0, 0
    for step in range(start_step, c.max_steps):
        lr = optim.set_lr(opt, step, c)
        rng = np.random.default_rng([c.seed, step])  # batches depend only on (seed, step): exact resume
        micro = [my_share(batch(rng, c.batch_size * W)) for _ in range(c.grad_accum)]
        n_tok = dist.all_reduce_sum(sum(int(m.sum()) for _, _, m, _ in micro))  # the whole step's normaliser
        total = 0.0
        for i, (x, y, m, v) in enumerate(micro):
            if dist.distributed():  # gradients are reduced across ranks once, after the last micro-batch
                model.set_requires_gradient_sync(i == len(micro) - 1)
            with dist.autocast(device, dtype):
                s, _ = token_loss_sum(model, x, y, m, v, vocab)
            # FSDP averages gradients over ranks: times W, the step's loss is sum(-log p) / n_tok over all ranks
            loss = s / max(n_tok, 1) * W + model.aux_loss() / c.grad_accum
            loss.backward()
            total += s.item()
        total = dist.all_reduce_sum(total)
        gnorm, ok = optim.optimizer_step(model, opt, total, c.grad_clip)
        bad = optim.count_bad_steps(ok, bad, step + 1, c.max_bad_steps, "the data")  # skipped: counted and logged
        loads = optim.pop_expert_loads(model)
        optim.update_router_bias(model, loads, c.bias_update_rate)
        tokens_seen += n_tok
        done = step + 1
        met = {"loss": total / max(n_tok, 1), "lr": lr, "grad_norm": gnorm, "skipped": int(not ok),
               "tokens_per_s": tokens_seen / (time.perf_counter() - t0)}
        if loads is not None:
            met["expert_imbalance"] = metrics.expert_imbalance(loads)
        if done % c.eval_every == 0 or done == c.max_steps:
            met["val_loss"] = evaluate()
        log.log(met, done)
        if done % c.log_every == 0 or done == c.max_steps:
            extra = f" val {met['val_loss']:.4f}" if met.get("val_loss") is not None else ""
            print0(f"step {done}/{c.max_steps} loss {met['loss']:.4f}{extra} lr {lr:.2e} "
                   f"gnorm {met['grad_norm']:.2f} {met['tokens_per_s']:.0f} tok/s "
                   f"{time.perf_counter() - t0:.0f}s")
        if done % c.ckpt_every == 0 or done == c.max_steps:
            checkpoint.save_checkpoint(c.out_dir, done, {"model": model}, opt, {
                "model_config": dataclasses.asdict(model.config), "step": done, "rng": dist.rng_state(),
                "config": dataclasses.asdict(c)}, c.keep_last)
    print0(f"saved {checkpoint.export_final(model, tok, c.out_dir)}")
    log.finish()
    return model


if __name__ == "__main__":
    config.cli(main, "sft.py")
