"""Next-token training (the toy base model's pretraining, cold start, rejection-sampling SFT, distillation) and
the reward model (Bradley-Terry on preference pairs, --objective=preference).

    python sft.py --data=out/toy/corpus.txt --tokenizer=out/toy/tokenizer.bpe --out-dir=out/base --max-steps=2000
    python sft.py --data=sft.jsonl --init-from=out/base --tokenizer=out/toy/tokenizer.bpe --out-dir=out/cold
    torchrun --standalone --nproc_per_node=8 sft.py --data=sft.jsonl --init-from=/path/to/hf_model ...
    python sft.py --objective=preference --data=prefs.jsonl --init-from=out/cold --tokenizer=... --out-dir=out/rm

Three kinds of data: two for next-token training, by file extension, and one for the reward model:
  .txt    raw text; documents separated by the tokenizer's end-of-text token written as text (<|endoftext|>).
          Training windows of seq_len tokens are cut at random offsets; the loss is on every token.
  .jsonl  one {"prompt": ..., "completion": ...} object per line (field names are flags). The model sees
          prompt + completion + end-of-text; the loss is on the completion and the end-of-text token only.
  .jsonl  with --objective=preference: one {"prompt": ..., "chosen": ..., "rejected": ...} object per line (field
          names are flags). The reward of a response is the end-of-text logit read at the end-of-text appended to
          prompt + response (reward_scores); the loss is Bradley-Terry, mean -log sigmoid(r_chosen - r_rejected)
          over the step's pairs, logged with the pair accuracy (the share of pairs with r_chosen > r_rejected).
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
import reward_model
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
    objective: Literal["next_token", "preference"] = "next_token"  # preference: train a reward model on pairs
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    chosen_field: str = "chosen"     # preference rows: the better response ...
    rejected_field: str = "rejected"  # ... and the worse one
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
    if c.objective == "preference":  # pairs of responses exist only as rows; there is no raw-text form
        for flag, path in (("data", c.data), ("val-data", c.val_data)):
            need(not path or path.endswith(".jsonl"), flag,
                 f"{path}: --objective=preference reads a .jsonl of prompt/chosen/rejected rows")


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
# the reward model (--objective=preference): reward_model.py reads its score (one row of the LM head) and holds
# the Bradley-Terry loss


def load_prefs(path, tok, c):
    """[(chosen ids, rejected ids)], each reward_model.reward_seq(prompt, response), from prompt/chosen/rejected
    rows."""
    rows, cut = [], 0
    for loc, obj in data.read_rows(path):
        for fld in (c.prompt_field, c.chosen_field, c.rejected_field):
            if not isinstance(obj.get(fld), str):
                raise DataError(f"{loc}: field {fld!r} missing or not a string")
        for fld in (c.chosen_field, c.rejected_field):
            if not obj[fld]:  # a reward for no response at all is a data bug, not a preference
                raise DataError(f"{loc}: field {fld!r} is empty")
        p = data.prompt_ids(tok, obj[c.prompt_field])  # as grpo.py will encode it
        resp = [tok.encode(obj[f]) for f in (c.chosen_field, c.rejected_field)]
        cut += max(len(p) + len(r) + 1 for r in resp) > c.seq_len
        rows.append(tuple(reward_model.reward_seq(p, r, tok.eot_id, c.seq_len) for r in resp))
    if not rows:
        raise DataError(f"{path}: no examples")
    if cut:
        print0(f"{path}: {cut:,} pair(s) longer than --seq-len={c.seq_len}, cut (sft.reward_seq)")
    return rows


def pref_batch(rows, n, rng):
    """n random preference rows -> ids (n, 2, L) and valid (n, 2, L); [:, 0] chosen, [:, 1] rejected."""
    pick = rng.integers(0, len(rows), size=n)
    x, valid = reward_model.pad_right([s for i in pick for s in rows[i]])  # (2n, L): chosen, rejected, chosen, ...
    return x.view(n, 2, -1), valid.view(n, 2, -1)


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
    else:  # rows: prompt/completion pairs, or prompt/chosen/rejected for a reward model
        pref = c.objective == "preference"
        load = load_prefs if pref else load_pairs
        draw = (lambda rs, rng, n: pref_batch(rs, n, rng)) if pref else \
            (lambda rs, rng, n: pair_batch(rs, n, c.seq_len, rng))  # noqa: E731
        rows = load(c.data, tok, c)
        val = load(c.val_data, tok, c) if c.val_data else None
        if val is None and c.val_frac > 0 and len(rows) >= 2:
            cut = max(1, int(len(rows) * (1 - c.val_frac)))
            rows, val = rows[:cut], rows[cut:] or None
        batch = lambda rng, n: draw(rows, rng, n)  # noqa: E731
        val_batch = (lambda rng, n: draw(val, rng, n)) if val else None  # noqa: E731
        print0(f"{c.data}: {len(rows):,} {'preference' if pref else 'prompt/completion'} pairs"
               + (f", {len(val):,} held-out" if val else ""))

    def my_share(xym):
        """This rank's rows of a global batch: every rank draws the same W * batch_size rows, keeps its slice,
        so W ranks see exactly the batch one process with W times the batch size would."""
        return tuple(t[R * c.batch_size:(R + 1) * c.batch_size].to(device) for t in xym)

    # a micro-batch's loss sum, what the step's normaliser counts in it, and (preference) its pairs ranked right
    if c.objective == "preference":
        def loss_sum(b):  # b: ids (n, 2, L), valid (n, 2, L)
            r = reward_model.seq_rewards(model, b[0].flatten(0, 1), b[1].flatten(0, 1), tok.eot_id)
            r = r.view(-1, 2)  # (n, 2): chosen, rejected
            return reward_model.bt_loss_sum(r[:, 0], r[:, 1])
        count, rate, per = (lambda b: len(b[0])), "pairs_per_s", "pairs/s"  # noqa: E731
    else:
        loss_sum = lambda b: (token_loss_sum(model, *b, vocab)[0], 0)  # noqa: E731
        count, rate, per = (lambda b: int(b[2].sum())), "tokens_per_s", "tok/s"  # noqa: E731

    checkpoint.write_run_config(c)
    log = metrics.MetricsLogger(c.out_dir, c, c.wandb_project, c.wandb_mode)
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters ({model.config.architecture}, "
           f"{model.config.n_routed_experts} routed experts), {device}, {dtype}, {W} process(es)")

    @torch.no_grad()
    def evaluate():
        if val_batch is None:
            return {"val_loss": None}
        model.eval()
        rng = np.random.default_rng(c.seed + 1)  # the same held-out windows (pairs) every time
        tot, n, right = 0.0, 0, 0
        for _ in range(c.eval_batches):
            b = my_share(val_batch(rng, c.batch_size * W))
            with dist.autocast(device, dtype):
                s, k = loss_sum(b)
            tot, n, right = tot + s.item(), n + count(b), right + k
        model.train()
        n = max(dist.all_reduce_sum(n), 1)
        out = {"val_loss": dist.all_reduce_sum(tot) / n}
        if c.objective == "preference":
            out["val_accuracy"] = dist.all_reduce_sum(right) / n
        return out

    t0, seen, bad = time.perf_counter(), 0, 0
    for step in range(start_step, c.max_steps):
        lr = optim.set_lr(opt, step, c)
        rng = np.random.default_rng([c.seed, step])  # batches depend only on (seed, step): exact resume
        micro = [my_share(batch(rng, c.batch_size * W)) for _ in range(c.grad_accum)]
        norm = dist.all_reduce_sum(sum(count(b) for b in micro))  # the whole step's tokens (pairs), all ranks
        total, right = 0.0, 0
        for i, b in enumerate(micro):
            if dist.distributed():  # gradients are reduced across ranks once, after the last micro-batch
                model.set_requires_gradient_sync(i == len(micro) - 1)
            with dist.autocast(device, dtype):
                s, k = loss_sum(b)
            # FSDP averages gradients over ranks: times W, the step's loss is the loss sum / norm over all ranks
            loss = s / max(norm, 1) * W + model.aux_loss() / c.grad_accum
            loss.backward()
            total, right = total + s.item(), right + k
        total = dist.all_reduce_sum(total)
        gnorm, ok = optim.optimizer_step(model, opt, total, c.grad_clip)
        bad = optim.count_bad_steps(ok, bad, step + 1, c.max_bad_steps, "the data")  # skipped: counted and logged
        loads = optim.pop_expert_loads(model)
        optim.update_router_bias(model, loads, c.bias_update_rate)
        seen += norm
        done = step + 1
        met = {"loss": total / max(norm, 1), "lr": lr, "grad_norm": gnorm, "skipped": int(not ok),
               rate: seen / (time.perf_counter() - t0)}
        if c.objective == "preference":
            met["accuracy"] = dist.all_reduce_sum(right) / max(norm, 1)  # before this step's update
        if loads is not None:
            met["expert_imbalance"] = metrics.expert_imbalance(loads)
        if done % c.eval_every == 0 or done == c.max_steps:
            met.update(evaluate())
        log.log(met, done)
        if done % c.log_every == 0 or done == c.max_steps:
            extra = "".join(f" {name} {met[k]:.4f}" for k, name in (("accuracy", "acc"), ("val_loss", "val"),
                            ("val_accuracy", "val acc")) if met.get(k) is not None)
            print0(f"step {done}/{c.max_steps} loss {met['loss']:.4f}{extra} lr {lr:.2e} "
                   f"gnorm {met['grad_norm']:.2f} {met[rate]:.0f} {per} "
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
