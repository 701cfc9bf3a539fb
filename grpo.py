"""GRPO, the RL algorithm of DeepSeek-R1-Zero (paper Eq. 1-3), as one readable loop.

    python grpo.py --preset=cpu --init-from=out/base --out-dir=out/rl              # the toy run on a laptop CPU
    torchrun --standalone --nproc_per_node=8 grpo.py --init-from=/path/to/hf_moe --task=math.jsonl \\
        --tokenizer=/path/to/hf_moe/tokenizer.json --out-dir=out/r1zero           # the paper's settings (defaults)

One rollout: take rollout_prompts prompts -> sample group_size (G) completions each -> rule rewards -> group
advantages A_i = (r_i - mean(r)) / (std(r) + eps) -> split the outputs randomly into num_minibatches mini-batches
and make mu passes over them, one optimizer step per mini-batch: per-token log-probs of the policy (fused LM head,
kernels.token_logprobs) -> clipped surrogate + beta * k3 KL per token -> aggregation -> backward -> grad clip ->
AdamW. A "step" is one optimizer update, as in the paper (8,192 outputs per rollout, 16 mini-batches, one pass:
16 steps per rollout). The math (advantages, the loss, its token weights) is in loss.py; run_loop holds one step.

Deviations from Eq. 1-3 (each is a flag; the paper preset = the dataclass defaults keeps the paper's choice where
the paper makes one):
- Ratios and clipping are per token (DeepSeekMath's GRPO), not per sequence as Eq. 1 is written; the paper does
  not say how tokens are aggregated: --loss-agg=seq_mean_token_mean (1/G sum_i 1/|o_i| sum_t, default),
  token_mean (DAPO) or dr_grpo (a constant normaliser, max_new_tokens per output).
- --adv-scale: group (Eq. 3, default), batch (std over the whole batch) or none (Dr. GRPO, no std). The std is the
  unbiased one (ddof=1, as TRL/verl/OpenRLHF); a group whose rewards span <= 1e-6 gets advantage exactly 0.
- Separate low/high clip (--eps-low/--eps-high, DAPO); the paper's single epsilon (10) is both.
- Optional, off by default: --mask-truncated, --overlong-buffer (DAPO soft penalty), --dynamic-sampling (drop
  zero-variance groups and refill), --routing-replay (train with the experts the sampler used, PITFALLS M6).
- The reference model becomes the current policy every --ref-refresh-every steps (paper: 400); beta=0: none.
- Loss variants (loss.py), off by default: --ratio-level=sequence (GSPO: one ratio per output, exp of its mean
  token log-ratio, clipped per output); --tis-cap=C (truncated IS: surrogate x min(pi_train / pi_sampler, C)) and
  --mis-low/--mis-high/--mis-level (masked IS: tokens, or outputs, whose ratio leaves the band give no gradient),
  both against the sampler's log-probs; --kl-estimator=k1|k2 (default k3); --kl-in-reward (-beta x each output's
  summed KL estimate on its reward before the advantages, no KL in the loss); --entropy-coef (an entropy bonus).
Defaults that differ from the paper: max_new_tokens (32,768, then 65,536 after step 8.2k: set it), weight decay
and AdamW betas (not given: 0.1, (0.9, 0.95)), warm-up (none given: 0), generation also stops at "</answer>" (the
format reward requires it to end the output). The cpu preset (the toy reproduction) changes many: see PRESETS.
"""
import collections
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

import checkpoint
import config
import data
import dist
import eval as evaluation
import loss
import metrics
import optim
import reward_model
import rewards
import rollout
import tasks
from config import ConfigError
from dist import print0
from loss import group_advantages  # noqa: F401  kept importable as grpo.group_advantages (public name)


@dataclass
class GRPOConfig:
    """nano-r1 grpo.py settings (defaults: the paper's R1-Zero values where it gives them)"""
    preset: str = "paper"
    out_dir: str = "out/grpo"
    init_from: str = ""              # the base policy: a checkpoint, run dir or Hugging Face dir (required)
    resume: bool = False             # continue from the newest checkpoint in out_dir
    tokenizer: str = ""              # default: <init_from>/tokenizer.bpe or <init_from>/final/tokenizer.bpe
    task: str = "toy"                # tasks.load_task name: toy, countdown, rg:<name>, humaneval, a .jsonl/.parquet
    task_size: int = 20000           # examples drawn for generated tasks (0 = whole file)
    template: Literal["r1_zero", "toy", "none"] = "r1_zero"  # Table 1 | a short one (CPU toy only) | none
    heldout_frac: float = 0.1        # this share of the task (by prompt hash) is never trained on
    # sampling
    rollout_prompts: int = 512       # prompts per rollout (paper: 8,192 outputs = 512 x 16)
    group_size: int = 16             # G outputs per prompt
    num_minibatches: int = 16        # optimizer steps per pass over a rollout (paper: 16)
    mu: int = 1                      # passes over each rollout (paper: 1)
    micro_batch_size: int = 16       # sequences per forward/backward (gradient accumulation inside a step)
    max_new_tokens: int = 32768
    batch_prompts: int = 0           # prompts sampled at once (x G rows in the KV cache); 0 = all of a rank's
    temperature: float = 1.0
    top_p: float = 1.0               # must stay 1: the trainer's log-probs are over the full vocabulary (P2)
    top_k: int = 0                   # must stay 0, likewise
    stop_strings: list = field(default_factory=lambda: ["</answer>"])
    # objective
    lr: float = 3e-6
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: down to min_lr_frac * lr at max_steps
    min_lr_frac: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eps_low: float = 10.0
    eps_high: float = 10.0
    beta: float = 0.001              # k3 KL weight in the loss; 0 = no reference model at all
    ref_refresh_every: int = 400     # reference <- current policy every this many steps (0 = never)
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "dr_grpo"] = "seq_mean_token_mean"
    adv_scale: Literal["group", "batch", "none"] = "group"
    adv_eps: float = 1e-6
    old_logp: Literal["auto", "recompute", "sampler"] = "auto"  # auto: detach when on-policy, else recompute
    mask_truncated: bool = False     # drop truncated outputs from the loss (and from its normaliser)
    overlong_buffer: int = 0         # DAPO soft overlong penalty over the last this-many tokens (0 = off)
    dynamic_sampling: bool = False   # drop zero-variance groups and sample more prompts to refill
    max_refills: int = 3
    skip_zero_adv: bool = False      # no forward/backward for outputs whose gradient is exactly 0 (train_step)
    routing_replay: bool = False     # train with the experts the sampler chose (MoE only)
    bias_update_rate: float = 0.0    # aux-loss-free balancing gamma; off in RL by default (PITFALLS M6)
    # variants of the loss (loss.py), each off by default
    ratio_level: Literal["token", "sequence"] = "token"  # sequence: GSPO, one clipped ratio per output
    tis_cap: float = 0.0             # truncated IS: surrogate x min(pi_train / pi_sampler, tis_cap); 0 = off
    mis_low: float = 0.0             # masked IS: drop tokens (or whole outputs, mis_level) whose
    mis_high: float = 0.0            #   pi_train / pi_sampler leaves [mis_low, mis_high]; mis_high 0 = off
    mis_level: Literal["token", "sequence"] = "token"
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in_reward: bool = False       # reward -= beta * the output's summed KL estimate; then no KL in the loss
    entropy_coef: float = 0.0        # loss -= entropy_coef * per-token entropy (an entropy bonus)
    # rewards
    accuracy_weight: float = 1.0
    format_weight: float = 1.0
    language_weight: float = 0.0     # the language-consistency reward (R1 stage 2); 0 = off
    lang: str = "en"
    rg_exact: bool = True            # reasoning-gym: demand an exact answer (its default gives partial credit, P12)
    # all-scenario RL (R1's last stage): general prompts, judged by learned reward models (reward_model.py)
    general_task: str = "toy-general"  # tasks.load_task name of the general prompts (kind "general")
    general_frac: float = 0.0        # share of each rollout's prompts that are general, from general_from_step on
    general_from_step: int = 0       # the late switch: the paper used preference rewards in the last 400 of 1,700
    rm_helpful: str = ""             # reward model of a general reply (the answer block: R1's final summary)
    rm_harmless: str = ""            # reward model of a whole general response (the reasoning too)
    code_isolation: Literal["strict", "weak"] = "strict"  # code rewards without root or user namespaces: refuse,
    #                                  or (weak) run behind weaker walls, knowingly (sandbox_runner.py says which)
    reward_workers: int = 2
    # bookkeeping
    max_steps: int = 10400
    eval_every: int = 0              # held-out pass@1 every this many steps (0 = off)
    eval_prompts: int = 128
    log_every: int = 1
    sample_every: int = 10           # decoded completions to samples.jsonl (0 = never)
    ckpt_every: int = 100            # rounded up to a rollout boundary
    keep_last: int = 2
    max_bad_steps: int = 5
    seed: int = 1337                 # sampling, prompt order, initial RNG state
    problem_seed: int = 1337         # which problems a generated task (toy, countdown, rg:) draws, train and held-out
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0
    wandb_project: str = ""
    wandb_mode: str = "online"


PRESETS = {
    "paper": {},  # the dataclass defaults
    # The toy R1-Zero reproduction on a 2-core CPU (train.sh). Small groups and batches, a short template, short
    # outputs (72 tokens: a 4-operand stepwise solution with its plain-text tags is 69), lr 1e-4 (2e-4 collapsed
    # accuracy: README, "What happened"), no KL (beta=0 saves the reference forward), the policy updated once per
    # rollout (num_minibatches=1: exactly on-policy).
    "cpu": dict(template="toy", task="toy", task_size=4000, rollout_prompts=16, group_size=8, num_minibatches=1,
                micro_batch_size=128, max_new_tokens=72, lr=1e-4, beta=0.0, eps_low=0.2, eps_high=0.2,
                max_steps=150, eval_every=25, eval_prompts=200, ckpt_every=25, sample_every=10, weight_decay=0.0,
                reward_workers=0, threads=2),
}


def check_config(c):
    need, W = config.need, dist.world_size()
    need(c.init_from or c.resume, "init-from", "a base policy is required (a checkpoint, run dir or HF dir)")
    need(c.group_size >= 2, "group-size", "GRPO needs at least 2 outputs per prompt")
    for f in ("rollout_prompts", "mu", "micro_batch_size", "max_new_tokens", "max_steps", "log_every", "ckpt_every"):
        need(getattr(c, f) >= 1, f, "must be >= 1")
    for f in ("eps_low", "eps_high", "beta", "sample_every", "overlong_buffer", "batch_prompts"):
        need(getattr(c, f) >= 0, f, "must be >= 0" + (" (>= 1: no lower clip)" if f == "eps_low" else ""))
    need(c.rollout_prompts % W == 0, "rollout-prompts", f"must be divisible by the number of ranks ({W})")
    local = c.rollout_prompts // W * c.group_size
    need(c.num_minibatches >= 1 and local % c.num_minibatches == 0, "num-minibatches",
         f"must divide each rank's {local} outputs per rollout")
    need(c.max_steps % (c.num_minibatches * c.mu) == 0, "max-steps", f"must be a multiple of num_minibatches * mu "
         f"= {c.num_minibatches * c.mu} (a run ends at a rollout boundary, where checkpoints are exact)")
    need(c.temperature > 0, "temperature", "must be > 0 (the trainer divides logits by it)")
    for flag, ok in (("top-p", c.top_p == 1.0), ("top-k", c.top_k == 0)):
        need(ok, flag, "top-p/top-k sampling makes sampler and trainer log-probs differ (PITFALLS P2); keep "
             "--top-p=1 --top-k=0 in training")
    need(c.overlong_buffer < c.max_new_tokens, "overlong-buffer", "must be below --max-new-tokens")
    need(0 <= c.general_frac < 1, "general-frac", "must be in [0, 1) (some prompts stay reasoning prompts)")
    need(c.general_frac == 0 or c.rm_helpful or c.rm_harmless, "general-frac",
         "general prompts need a reward model (--rm-helpful and/or --rm-harmless)")
    need(c.general_frac == 0 or round(c.general_frac * c.rollout_prompts / W) >= 1, "general-frac",
         f"gives no general prompt out of {c.rollout_prompts // W} per rank and rollout")
    need(c.lr > 0, "lr", "must be > 0")
    need(not c.skip_zero_adv or (c.beta == 0 or c.kl_in_reward) and c.entropy_coef == 0, "skip-zero-adv",
         "needs --beta=0 (or --kl-in-reward) and --entropy-coef=0: their gradients reach zero-advantage outputs too")
    need(c.tis_cap == 0 or c.tis_cap >= 1, "tis-cap", "must be 0 (off) or >= 1 (below 1 it shrinks every token)")
    need(c.mis_high == 0 or 0 <= c.mis_low < 1 < c.mis_high, "mis-high",
         f"the band needs 0 <= --mis-low < 1 < --mis-high (got [{c.mis_low}, {c.mis_high}]); --mis-high=0 is off")
    need(c.mis_low == 0 or c.mis_high > 0, "mis-low", "needs --mis-high (masked IS is off while --mis-high=0)")
    need(not (c.tis_cap or c.mis_high) or c.old_logp != "sampler", "old-logp",
         "--old-logp=sampler makes pi_train / pi_sampler 1 on every token: --tis-cap/--mis-high would do nothing")
    need(not c.kl_in_reward or c.beta > 0, "kl-in-reward", "needs --beta > 0 (the penalty's weight)")
    need(not c.kl_in_reward or c.general_frac == 0, "kl-in-reward", "is not implemented with --general-frac > 0")
    need(c.entropy_coef >= 0, "entropy-coef", "must be >= 0 (a bonus)")


# ----------------------------------------------------------------------------------------------------------------
# sampling and scoring a rollout


def collect_rollout(policy, tok, sampler, c, step, template, stop_ids, general=None):
    """Sample and score one rollout (this rank's share of the prompts) -> (Batch with advantages, stats). With
    dynamic sampling, zero-variance groups are dropped and refilled; every rank takes part in every refill round
    (the decision is global) and walks the prompt order in step, so ranks never disagree about collectives or
    cursors. general: {"sampler", "rms"} for all-scenario RL: from general_from_step on, general_frac of the
    prompts of the first round are general ones (refills draw reasoning prompts)."""
    G, n_local = c.group_size, c.rollout_prompts // dist.world_size()
    outs, groups, refills = collections.defaultdict(list), 0, 0
    stats = {"sample_s": 0.0, "new_tokens": 0, "zero_std_groups": 0, "sampled_groups": 0,
             "reasons": collections.Counter(), "general": collections.defaultdict(float)}
    n_gen = round(c.general_frac * n_local) if general and step >= c.general_from_step else 0
    with dist.gathered(policy):  # under FSDP: weights all-gathered once for every generation of this rollout
        while True:
            need = int(dist.all_reduce_max(n_local - groups))
            if need == 0:
                break
            g = n_gen if refills == 0 else 0
            exs = (sampler.take(need - g) + (general["sampler"].take(g) if g else []))[:n_local - groups]  # every
            #     rank draws the same count; some use fewer
            got, zero = score_round(policy, tok, exs, c, step, refills, template, stop_ids, stats,
                                    general["rms"] if general else {})
            for p in range(len(exs)):
                if c.dynamic_sampling and zero[p] and refills < c.max_refills:
                    continue  # no learning signal: refill with new prompts
                for k, v in got.items():
                    outs[k] += v[p * G:(p + 1) * G]
                groups += 1
            refills += 1
    stats["refills"] = refills - 1
    experts = outs.pop("experts")
    return rollout.make_batch(**outs, experts=experts if c.routing_replay else None), stats


def score_round(policy, tok, exs, c, step, refills, template, stop_ids, stats, rms=None):
    """G samples for each example, their rewards and group advantages -> (per-output lists for make_batch, a
    zero-variance flag per group). Collective calls (the batch std) happen on every rank, even one with none.
    General examples (kind "general") are scored by the reward models rms, the others by the rule rewards."""
    G = c.group_size
    out, shaped, total, comps, texts = None, torch.zeros(0, G), [], {}, []
    if exs:
        prompts = [data.prompt_ids(tok, e.prompt, template) for e in exs]
        seed = int(np.random.SeedSequence([c.seed, step, refills, dist.rank()]).generate_state(1)[0])
        out = rollout.generate(policy, prompts, c.max_new_tokens, c.temperature, num_samples=G, stop_ids=stop_ids,
                               stop_strings=c.stop_strings, decode=tok.decode, vocab_size=tok.vocab_size, seed=seed,
                               record_experts=c.routing_replay, prompt_batch=c.batch_prompts)
        stats["sample_s"] += out.seconds
        stats["new_tokens"] += out.new_tokens
        texts = rollout.completion_texts(tok, out, stop_ids)
        weights = {"accuracy": c.accuracy_weight, "format": c.format_weight, "language": c.language_weight}
        rows = [exs[i // G] for i in range(len(texts))]
        gen = [i for i, e in enumerate(rows) if e.kind == "general"]
        rule = [i for i, e in enumerate(rows) if e.kind != "general"]
        total, comps = [0.0] * len(texts), {"accuracy": [None] * len(texts), "format": [0.0] * len(texts),
                                            "language": [None] * len(texts)}
        if rule:
            part, parts, reasons = rewards.score_batch([texts[i] for i in rule], [rows[i] for i in rule], weights,
                                                       workers=c.reward_workers, lang=c.lang, rg_exact=c.rg_exact,
                                                       code_isolation=c.code_isolation,
                                                       answer_block=bool(template))  # as eval.py
            stats["reasons"].update(reasons)
            for j, i in enumerate(rule):
                total[i] = part[j]
                for k in comps:
                    comps[k][i] = parts[k][j]
        if gen:
            part, fmt = reward_model.general_rewards(tok, [texts[i] for i in gen], [rows[i] for i in gen], rms,
                                                     c.format_weight, stats["general"])
            for j, i in enumerate(gen):
                total[i], comps["format"][i] = part[j], fmt[j]
        shaped = torch.tensor([t + loss.overlong_penalty(len(ids), c.max_new_tokens, c.overlong_buffer)
                               for t, ids in zip(total, out.tokens)]).view(len(exs), G)
    # an example whose correctness cannot be judged (unparseable gold, broken tests: accuracy None) must not
    # train its group on the other rewards alone
    unjudged = torch.tensor([c.accuracy_weight != 0 and exs[j].kind != "general" and
                             all(a is None for a in comps["accuracy"][j * G:(j + 1) * G]) for j in range(len(exs))],
                            dtype=torch.bool)
    adv = loss.advantages(shaped, unjudged, c)  # on every rank, even one with no examples (the batch std)
    if not exs:
        return {}, []
    if unjudged.any():
        stats["reasons"]["unjudged_example"] += int(unjudged.sum())
    zero = (adv.abs().sum(1) == 0).tolist()
    stats["zero_std_groups"] += sum(zero)
    stats["sampled_groups"] += len(zero)
    nan = lambda x: math.nan if x is None else x  # noqa: E731
    scores = [[total[i], nan(comps["accuracy"][i]), comps["format"][i], nan(comps["language"][i])]
              for i in range(len(texts))]
    return dict(prompts=[p for p in prompts for _ in range(G)], completions=out.tokens, sampler_logp=out.logprobs,
                adv=adv.view(-1).tolist(), keep=[not (c.mask_truncated and t) for t in out.truncated],
                experts=out.experts or [], scores=scores, truncated=out.truncated, texts=texts), zero


@torch.no_grad()
def kl_reward(policy, ref, b, c, vocab):
    """--kl-in-reward: each output's reward gets -beta * the sum over its tokens of the KL estimate between the
    policy at sampling time (pi_old) and the reference, then the group advantages are computed again (b.adv). The
    reference forward runs on the whole rollout here, before any update; the loss then has no KL term. Dynamic
    sampling chose the groups on the task rewards; --adv-scale=batch takes the std over the whole rollout (score_round:
    over one sampling round). Returns the rollout's mean per-token KL over every rank."""
    pol = b.old_logp if b.old_logp is not None else old_logprobs(policy, b, c, vocab)  # (B, C)
    ref_lp = old_logprobs(ref, b, c, vocab, replay=False)  # (B, C); no replay, as the reference in train_step
    inside = torch.arange(pol.shape[1]) < b.comp_len[:, None]  # (B, C) the completion tokens
    kl = torch.where(inside, loss.kl_estimate(ref_lp - pol, c.kl_estimator)[0], 0.0).sum(1)  # (B,)
    pen = torch.tensor([loss.overlong_penalty(L, c.max_new_tokens, c.overlong_buffer) for L in b.comp_len.tolist()],
                       dtype=torch.float64)
    task = (b.scores[:, 0] + pen).float()  # (B,) the rewards score_round shaped, fp32 as there
    unjudged = torch.isnan(b.scores[:, 1]).view(-1, c.group_size).all(1) & (c.accuracy_weight != 0)
    b.adv = loss.advantages((task - c.beta * kl).view(-1, c.group_size), unjudged, c).view(-1)
    return dist.all_reduce_sum(float(kl.sum())) / max(1.0, dist.all_reduce_sum(float(b.comp_len.sum())))


# ----------------------------------------------------------------------------------------------------------------
# one update


def token_logprobs(model, b, packed, vocab, temperature, replay=False, entropy=False):
    """log p (N,) of every completion token of b (and the entropy), rows in order; packed = rollout.pack(b), made
    once per micro-batch for the policy and the reference; replay: route every token to the sampler's experts."""
    dev = model.lm_head.weight.device
    x, valid, rows, t, cols = packed
    routes = b.routes[:, :x.shape[1]].to(dev) if replay else None
    # over the tokenizer's ids only: the sampler never gives a padded LM head's rows any mass (P15)
    return model.logprobs(x.to(dev), rows.to(dev), cols.to(dev), b.tokens[rows, cols + 1].to(dev), temperature,
                          vocab, return_entropy=entropy, valid=valid.to(dev), routes=routes)


def train_step(policy, ref, opt, b, c, vocab, on_policy):
    """One optimizer update on mini-batch b: per micro-batch, log-probs -> per-token loss -> weighted sum ->
    backward; then clip and AdamW. Returns metrics (sums over the tokens of this rank's rows it ran)."""
    w_row, B = loss.token_weights(b, c), len(b.adv)
    m = dict(loss=0.0, kl=0.0, kl_capped=0.0, entropy=0.0, clip_low=0.0, clip_high=0.0, tokens=0, gap=0.0,
             gap_max=0.0, mis_masked=0.0)
    chunks = loss.live_rows(b, c)  # index tensors, one per micro-batch
    if c.skip_zero_adv:
        m["rows_run"] = sum(map(len, chunks))
        if not chunks:  # no row on any rank has a gradient: AdamW still steps on zeros (moments decay, as unskipped)
            for p in (p for p in policy.parameters() if p.requires_grad):
                p.grad = torch.zeros_like(p)
    for j, idx in enumerate(chunks):
        mb = b[idx]
        if dist.distributed():  # reduce gradients over ranks once, after the last micro-batch
            policy.set_requires_gradient_sync(j == len(chunks) - 1)
        packed = rollout.pack(mb)
        logp, ent = token_logprobs(policy, mb, packed, vocab, c.temperature, c.routing_replay, entropy=True)  # (N,)
        dev, (_, _, rows, t, _) = logp.device, packed
        adv, w, keep = mb.adv[rows].to(dev), w_row[idx][rows].float().to(dev), mb.keep[rows].to(dev)  # (N,) each
        old = None if on_policy else mb.old_logp[rows, t].to(dev)
        # the reference is frozen (requires_grad off): no graph is built for it; --kl-in-reward used it already
        ref_logp = (token_logprobs(ref, mb, packed, vocab, c.temperature)
                    if ref is not None and c.beta > 0 and not c.kl_in_reward else None)
        sampler, mk, rows_d = mb.sampler_logp[rows, t].to(dev), keep.float(), rows.to(dev)
        is_w, dropped = None, torch.zeros_like(keep)
        if c.tis_cap or c.mis_high:  # pi_train: the trainer at the old parameters (detached logp when on-policy)
            is_w, dropped = loss.sampler_correction(logp.detach() if old is None else old, sampler, keep, rows_d, c)
        # the definition (loss.grpo_loss), or on a GPU its fused Triton twin once it has matched the definition
        loss_tok, st = loss.grpo_loss_auto(logp, old, ref_logp, adv, keep, c.eps_low, c.eps_high, c.beta,
                                           rows=rows_d, ratio_level=c.ratio_level, is_weight=is_w,
                                           kl_estimator=c.kl_estimator, entropy=ent, entropy_coef=c.entropy_coef)
        total = (loss_tok * w).sum() * dist.world_size()  # FSDP averages gradients over ranks: undo it
        total = total + policy.aux_loss() * len(idx) / max(1, B)
        total.backward()
        with torch.no_grad():  # diagnostics, summed over this micro-batch's tokens (stats are 0 where masked)
            gap = (sampler - logp).abs() * mk
            for k, v in (("loss", loss_tok * w), ("entropy", ent * mk), ("kl", st.kl), ("kl_capped", st.kl_capped),
                         ("clip_low", st.clipped_low), ("clip_high", st.clipped_high), ("gap", gap),
                         ("tokens", mk), ("mis_masked", dropped.float())):
                m[k] += v.sum().item()
            m["gap_max"] = max(m["gap_max"], gap.max().item() if gap.numel() else 0.0)
    m["grad_norm"], m["ok"] = optim.optimizer_step(policy, opt, m["loss"], c.grad_clip)
    return m


@torch.no_grad()
def old_logprobs(policy, b, c, vocab, replay=True):
    """pi_old (B, C), frozen before the first update of a rollout (when one rollout feeds several updates); also
    the reference's log-probs for --kl-in-reward (replay=False)."""
    old = torch.zeros_like(b.sampler_logp)
    for idx in loss.length_chunks(b, torch.arange(len(b.adv)), c.micro_batch_size):
        mb = b[idx]
        packed = rollout.pack(mb)
        old[idx[packed[2]], packed[3]] = token_logprobs(policy, mb, packed, vocab, c.temperature,
                                                        c.routing_replay and replay).float().cpu()
    return old


# ----------------------------------------------------------------------------------------------------------------
# metrics


def log_step(log, step, b, m, stats, loads, lr, train_s, elapsed, c, heldout_eval):
    """One optimizer step's metrics over every rank (outputs gathered, sums all-reduced) -> metrics.jsonl (+ wandb),
    samples.jsonl, the console line and the warnings."""
    scores = [[None if math.isnan(x) else x for x in r] for r in b.scores.tolist()]  # nan: not scored
    rows = dist.all_gather([(*s, L, tr, evaluation.reflective_count(tx))
                            for s, L, tr, tx in zip(scores, b.comp_len.tolist(), b.truncated.tolist(), b.texts)])
    reward, acc, fmt, lang, lens, trunc, refl = zip(*rows)
    s = {k: dist.all_reduce_sum(v) for k, v in m.items() if k not in ("grad_norm", "ok", "gap_max")}
    n, ntok = len(rows), max(1, s["tokens"])
    acc, lang = [a for a in acc if a is not None], [x for x in lang if x is not None]
    term = [L for L, t in zip(lens, trunc) if not t]
    met = {"reward": sum(reward) / n, "accuracy": sum(acc) / max(1, len(acc)), "format": sum(fmt) / n,
           "len_mean": sum(lens) / n, "len_min": min(lens), "len_max": max(lens),
           "len_terminated": sum(term) / max(1, len(term)), "truncated": sum(trunc) / n,
           "reflective_per_token": sum(refl) / max(1, sum(lens)), "loss": s["loss"], "entropy": s["entropy"] / ntok,
           "kl": s["kl"] / ntok, "kl_capped": s["kl_capped"] / ntok,  # share of tokens at the k3 cap (K3_MAX)
           "clip_low": s["clip_low"] / ntok, "clip_high": s["clip_high"] / ntok,
           "sampler_trainer_gap": s["gap"] / ntok, "sampler_trainer_gap_max": dist.all_reduce_max(m["gap_max"]),
           "grad_norm": m["grad_norm"], "lr": lr,
           "skipped_steps": 0 if m["ok"] else 1, "refills": stats["refills"], "elapsed_s": elapsed,
           "frac_reward_zero_std": dist.all_reduce_sum(stats["zero_std_groups"]) /
           max(1, dist.all_reduce_sum(stats["sampled_groups"])),
           "train_tok_s": dist.all_reduce_sum(int((b.prompt_len + b.comp_len).sum())) / train_s,
           "sample_tok_s": dist.all_reduce_sum(stats["new_tokens"]) / max(stats["sample_s"], 1e-9),
           "zero_reasons": dict(sum(dist.all_gather([stats["reasons"]]), collections.Counter()))}
    if lang:
        met["language"] = sum(lang) / len(lang)
    if c.general_frac:  # all-scenario RL: the reward models' mean scores and the toy's hidden rule beside them
        met.update(reward_model.general_metrics(stats["general"], [k for k in ("helpful", "harmless")
                                                                   if getattr(c, f"rm_{k}")]))
    if c.mis_high:
        met["mis_masked"] = s["mis_masked"] / ntok  # share of tokens masked IS dropped
    if c.skip_zero_adv:  # the share of outputs run (FSDP fillers too); the per-token statistics and the expert
        # loads cover only theirs
        met["rows_run"] = s["rows_run"] / n
        if not s["tokens"]:
            met.update(dict.fromkeys(("entropy", "kl", "kl_capped", "clip_low", "clip_high", "sampler_trainer_gap")))
    if c.kl_in_reward:
        met["kl"] = stats["kl_reward"]  # the loss has no KL term: the rollout's, as the rewards got it
    if loads is not None:  # counted in the training forwards: none ran when --skip-zero-adv skipped every row
        met["expert_imbalance"] = metrics.expert_imbalance(loads) if loads.sum() > 0 else None
    if c.eval_every and step % c.eval_every == 0:
        ev = heldout_eval()
        met.update(heldout_pass1=ev["pass@1"], heldout_format=ev["format_rate"])
    log.log(met, step)
    if c.sample_every and step % c.sample_every == 0:
        metrics.append_jsonl(os.path.join(c.out_dir, "samples.jsonl"), [
            {"step": step, "text": tx, "reward": s[0], "acc": s[1], "adv": a}
            for tx, s, a in zip(b.texts[:4], scores, b.adv.tolist())])
    if step % c.log_every == 0:
        ev = f" | heldout {met['heldout_pass1']:.3f}" if "heldout_pass1" in met else ""
        print0(f"step {step} | reward {met['reward']:.3f} acc {met['accuracy']:.3f} fmt {met['format']:.3f} | len "
               f"{met['len_mean']:.1f} trunc {met['truncated']:.2f} | kl {met['kl'] or 0:.4f} clip "
               f"{met['clip_low'] or 0:.3f}/{met['clip_high'] or 0:.3f} | gnorm {met['grad_norm']:.2f} lr {lr:.1e} | "
               f"{met['sample_tok_s']:.0f}/{met['train_tok_s']:.0f} tok/s{ev} | {elapsed:.0f}s")
    if met["truncated"] > 0.5:
        print0(f"WARNING step {step}: {met['truncated']:.0%} of completions hit --max-new-tokens")


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    c = config.parse_config(GRPOConfig, argv, PRESETS)
    check_config(c)
    device, dtype = dist.start(c)
    state = checkpoint.resume_state(c)  # on resume the weights come with restore_checkpoint below
    policy = checkpoint.build_model(c.init_from, state, device, dtype).train()
    tok = data.Tokenizer.from_file(checkpoint.find_tokenizer(c.tokenizer, c.init_from or c.out_dir))
    vocab = tok.vocab_size
    checkpoint.check_vocab(policy, tok)
    if c.skip_zero_adv and policy.config.aux_loss_alpha > 0:
        raise ConfigError(f"--skip-zero-adv: {c.init_from} has a balance loss (aux_loss_alpha "
                          f"{policy.config.aux_loss_alpha}) whose gradient reaches zero-advantage outputs too")
    stop_ids = rollout.stop_ids_for(policy, tok)
    template = data.TEMPLATES[c.template]
    train_ex = tasks.load_task(c.task, n=c.task_size, seed=c.problem_seed, split="train", heldout_frac=c.heldout_frac)
    held_ex = tasks.load_task(c.task, n=c.eval_prompts, seed=c.problem_seed, split="heldout",
                              heldout_frac=c.heldout_frac) if c.eval_every else []
    general = None
    if c.general_frac > 0:  # all-scenario RL: general prompts and the frozen reward models that judge them
        rms = {kind: checkpoint.build_model(path, None, device, dtype, f"--rm-{kind}").eval().requires_grad_(False)
               for kind, path in (("helpful", c.rm_helpful), ("harmless", c.rm_harmless)) if path}
        kw = {} if c.general_task == "toy-general" else {"kind": "general"}  # a file: prompts only, no gold
        general = {"sampler": tasks.PromptSampler(tasks.load_task(c.general_task, split="train", **kw), c.seed + 1),
                   "rms": rms}
    ref = None
    if c.beta > 0:  # a frozen copy (loaded again, sharded like the policy); with beta = 0 never built (PITFALLS P11)
        ref = checkpoint.build_model(c.init_from, state, device, dtype).eval().requires_grad_(False)
    opt = optim.adamw(policy, c.lr, c.weight_decay, (c.beta1, c.beta2))
    step, sampler, bad = 0, tasks.PromptSampler(train_ex, c.seed), 0
    if state is not None:
        if state.get("has_ref") != (ref is not None):
            raise ConfigError(f"--beta: the checkpoint was written with{'out' if ref is not None else ''} a "
                              "reference model (beta > 0 and beta = 0 runs cannot resume each other)")
        checkpoint.restore_checkpoint(state, {"model": policy, "ref": ref}, opt)
        dist.set_rng_state(state["rng"])
        step, bad = state["step"], state["bad_steps"]
        sampler = tasks.PromptSampler(train_ex, c.seed, *state["sampler"])
        if general:
            general["sampler"] = tasks.PromptSampler(general["sampler"].examples, c.seed + 1,
                                                     *state["general_sampler"])
    checkpoint.write_run_config(c, tok)  # a --resume needs nothing but out_dir
    log = metrics.MetricsLogger(c.out_dir, c, c.wandb_project, c.wandb_mode)
    print0(f"policy {policy.num_params() / 1e6:.2f}M params; {len(train_ex)} train prompts; preset {c.preset}; "
           f"{c.rollout_prompts} prompts x {c.group_size} per rollout, {c.num_minibatches} mini-batches, mu={c.mu}")
    heldout_eval = lambda: evaluation.evaluate(  # noqa: E731 pass@1 (k=1) at the paper's T=0.6, top-p 0.95
        policy, tok, held_ex, k=1, template=template, temperature=0.6, top_p=0.95, max_new_tokens=c.max_new_tokens,
        seed=c.seed, workers=c.reward_workers, stop_strings=c.stop_strings, rg_exact=c.rg_exact,
        code_isolation=c.code_isolation)
    with dist.autocast(device, dtype):
        run_loop(policy, ref, opt, tok, sampler, c, step, bad, template, stop_ids, vocab, log, heldout_eval,
                 general)
    final = checkpoint.export_final(policy, tok, c.out_dir)
    log.finish()
    print0(f"done: {c.max_steps} steps; policy saved to {final}")
    return policy


def run_loop(policy, ref, opt, tok, sampler, c, step, bad, template, stop_ids, vocab, log, heldout_eval,
             general=None):
    """Rollouts and updates until max_steps, with a checkpoint at rollout boundaries."""
    t_start, last_ckpt = time.perf_counter(), step
    # exactly on-policy (ratio 1, old log-probs = the detached new ones) only when each rollout feeds one update
    on_policy = c.mu == 1 and c.num_minibatches == 1 and c.old_logp == "auto"
    if c.eval_every and step == 0:  # the curve starts at the base policy
        ev = heldout_eval()
        log.log({"heldout_pass1": ev["pass@1"], "heldout_format": ev["format_rate"]}, 0)
    while step < c.max_steps:
        # sample G outputs per prompt -> rule rewards -> group advantages, all in a Batch of tensors
        batch, stats = collect_rollout(policy, tok, sampler, c, step, template, stop_ids, general)
        if stats["zero_std_groups"] == stats["sampled_groups"]:
            print0(f"WARNING step {step}: every group has zero reward variance: no policy-gradient signal")
        if c.old_logp == "sampler":
            batch.old_logp = batch.sampler_logp
        elif not on_policy:
            batch.old_logp = old_logprobs(policy, batch, c, vocab)
        if c.kl_in_reward:  # -beta * KL on each reward before the advantages (they are computed again)
            stats["kl_reward"] = kl_reward(policy, ref, batch, c, vocab)
        rng = np.random.default_rng([c.seed, step])
        for _ in range(c.mu):
            perm = torch.from_numpy(rng.permutation(len(batch.adv)))
            per_mb = len(perm) // c.num_minibatches
            for k in range(c.num_minibatches):
                if step >= c.max_steps:
                    break
                mb = batch[perm[k * per_mb:(k + 1) * per_mb]]  # -> log-probs -> loss -> AdamW in train_step
                lr = optim.set_lr(opt, step, c)
                t0 = time.perf_counter()
                m = train_step(policy, ref, opt, mb, c, vocab, on_policy)
                train_s = time.perf_counter() - t0
                loads = optim.pop_expert_loads(policy)
                optim.update_router_bias(policy, loads, c.bias_update_rate)
                step += 1
                if ref is not None and c.ref_refresh_every and step % c.ref_refresh_every == 0:
                    ref.load_state_dict(policy.state_dict())
                log_step(log, step, mb, m, stats, loads, lr, train_s, time.perf_counter() - t_start, c,
                         heldout_eval)
                bad = optim.count_bad_steps(m["ok"], bad, step, c.max_bad_steps, "the rewards")
        if step - last_ckpt >= c.ckpt_every or step >= c.max_steps:  # at a rollout boundary: nothing in flight
            last_ckpt = step
            checkpoint.save_checkpoint(c.out_dir, step, {"model": policy, "ref": ref}, opt, {
                "model_config": dataclasses.asdict(policy.config), "step": step, "rng": dist.rng_state(),
                "sampler": (sampler.epoch, sampler.pos), "bad_steps": bad, "has_ref": ref is not None,
                "general_sampler": (general["sampler"].epoch, general["sampler"].pos) if general else None,
                "config": dataclasses.asdict(c)},
                c.keep_last)
    print0(f"{step} steps in {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    config.cli(main, "grpo.py")
