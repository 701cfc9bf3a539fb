"""One GRPO step (sample a rollout, score it, one optimizer update) of grpo.py against TRL's GRPOTrainer on the same
model and prompts, in one process, interleaved: TRL, ours, TRL, ours ... after one warm-up step each.

    pip install -r requirements-bench.txt            # TRL and its pins; our side needs only the test requirements
    python bench/grpo_step.py [--reps=5] [--betas=0,0.04] [--threads=2] [--sides=trl,ours]

The model: a tiny DeepSeek-V3-style MoE (1.04M parameters: d=96, 3 layers, the first dense, then 8 routed experts
top-2 in 2 groups + 1 shared, MLA), built with model.Transformer and written once with hf.save into one Hugging Face
directory with a byte-level BPE tokenizer.json of exactly 512 ids (the model's vocabulary) trained by `tokenizers`.
TRL loads that directory with transformers (DeepseekV3ForCausalLM, PreTrainedTokenizerFast); ours with
checkpoint.build_model and data.Tokenizer.from_file, as grpo.py does.

Matched on both sides: 8 toy problems (4 operands, so every prompt has the same token count and nothing is padded)
in the toy template, G=8 samples each (64 completions), exactly --new=64 new tokens per completion (see below),
temperature 1, top-p 1, top-k off; fp32, --threads torch threads; one optimizer step per rollout on all 64
completions in one micro-batch (exactly on-policy: ratio 1, no old log-probs); AdamW lr 1e-5, betas (0.9, 0.999),
eps 1e-8, no weight decay, constant lr, grad-norm clip 1.0; clip epsilon 0.2; group-scaled advantages (unbiased
std); loss = mean over completions of the token mean (TRL loss_type "grpo" = our seq_mean_token_mean); entropy
computed in training; no MoE aux loss; beta 0 (no reference model built) and beta 0.04 (a frozen reference loaded
from the same directory, k3 KL in the loss). Rewards: a seeded uniform random number per completion on both sides
(no group has zero variance, so both do the whole update); ours replaces only rewards.score_batch, inside
grpo.collect_rollout, for the timed call.

What is timed. Ours: what grpo.run_loop does for one step: collect_rollout (rollout.generate, decoding, rewards,
advantages, make_batch), set_lr, train_step (policy and reference log-probs, loss, backward, clip, AdamW) and the
router-load bookkeeping; not log_step (metrics.jsonl) or checkpoints. TRL: its own trainer.train() loop, one optimizer
step = on_step_begin -> on_step_end (its training_step, which generates and scores, then the clip, optimizer and
scheduler steps), measured by a callback that then runs one of our steps outside TRL's window; its logging and
saving are off. Phases: generate = the sampler call (TRL: _generate, which also tokenizes prompts and decodes;
ours: rollout.generate, while tokenizing and decoding count in score); score = the rest of the rollout (rewards,
advantages, tensors); train = the update. TRL computes the reference log-probs while scoring and we compute them in
train_step: the bench moves TRL's reference forward into its train column, so each column holds the same work.

Not matched (cannot be, or not without changing one side):
- Completion length: ours has no stop ids or stop strings, so every row samples exactly --new tokens and its
  end-of-text is an ordinary token; TRL always stops at the tokenizer's EOS and masks after it, so it runs with
  min_new_tokens=--new, which sets the EOS logit to -inf while sampling (about 1/512 of the mass here): same length
  and work, a slightly different sampling distribution.
- Random streams: transformers samples with torch.multinomial, ours by inverse CDF with its own generator, and the
  random rewards come from two streams: same distributions, different samples and advantages.
- The models' implementations are the thing compared: transformers' DeepseekV3 (SDPA attention, its MoE, a KV cache
  over 64 rows with one prefill per row, TRL's fused LM-head log-probs) against ours (one prefill per prompt copied
  to its G rows, MLA's absorbed decode, kernels.token_logprobs).
- Extra work ours does: the sampler returns each token's log-prob (TRL's transformers path does not), and the KL is
  capped per token at 10 (kernels.K3_MAX; never binds next to a reference this close). Advantage eps: 1e-4 in TRL,
  1e-6 ours.
- Bookkeeping: TRL's in-step metrics (lengths, rewards, clip ratios, KL, entropy) are timed; our log_step is not (its
  numbers are computed in train_step, which is timed, but written by log_step, which is not).
Run it alone: a second busy process on 2 cores distorts every number. Goal (the issue): ours <= 1/3 of TRL's total.
"""
import argparse
import collections
import os
import random
import shutil
import statistics
import string
import sys
import tempfile
import time
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import grpo  # noqa: E402
import hf  # noqa: E402
import optim  # noqa: E402
import rewards  # noqa: E402
import tasks  # noqa: E402
import toy  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

PHASES = ("generate", "score", "train", "total")
VOCAB = 512
EOT = "<|endoftext|>"


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--betas", default="0,0.04")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sides", default="trl,ours", help="trl,ours, or ours alone (no TRL needed)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.betas = [float(b) for b in a.betas.split(",")]
    a.sides = a.sides.split(",")
    if set(a.sides) - {"trl", "ours"} or "ours" not in a.sides:
        ap.error("--sides: trl,ours or ours")
    return a


# ----------------------------------------------------------------------------------------------------------------
# the shared checkpoint


def train_tokenizer(path, seed=0):
    """A byte-level BPE tokenizer.json of exactly VOCAB ids, which both sides read. Trained on toy documents plus
    seeded random lowercase words: the toy text alone runs out of pairs to merge near 280 ids, and a tokenizer smaller
    than the model's vocabulary would make the sides' softmaxes differ (ours scores over the tokenizer's ids only).
    Split with data.PATTERN (every digit its own token), so all 4-operand prompts have the same length."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(data.PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(seed)
    words = [" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(40))
             for _ in range(500)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(toy.toy_corpus(2000, seed)) + words, trainer)
    if tok.get_vocab_size() != VOCAB:
        raise RuntimeError(f"train_tokenizer: {tok.get_vocab_size()} ids, want {VOCAB}")
    tok.save(path)


def write_checkpoint(path, seed=0):
    """The one Hugging Face directory both sides load: config.json, model.safetensors, tokenizer.json."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, n_group=2, topk_group=1,
                      max_position_embeddings=1024)
    torch.manual_seed(seed)
    hf.save(Transformer(cfg), path)
    train_tokenizer(os.path.join(path, "tokenizer.json"), seed)


def problems(a):
    return toy.toy_problems(a.prompts, "train", seed=a.seed, operands=(4, 4))


def median_min(rows, key):
    xs = [r[key] for r in rows]
    return statistics.median(xs), min(xs)


# ----------------------------------------------------------------------------------------------------------------
# ours: grpo.py's own functions, as run_loop calls them


def ours_setup(hf_dir, a, beta):
    """Policy (+ frozen reference when beta > 0), AdamW, tokenizer and prompt sampler, built as grpo.main builds
    them, with the bench's settings."""
    c = grpo.GRPOConfig(init_from=hf_dir, template="toy", rollout_prompts=a.prompts, group_size=a.group,
                        num_minibatches=1, micro_batch_size=a.prompts * a.group, max_new_tokens=a.new,
                        temperature=1.0, stop_strings=[], lr=a.lr, weight_decay=0.0, beta1=0.9, beta2=0.999,
                        grad_clip=1.0, eps_low=0.2, eps_high=0.2, beta=beta, reward_workers=0, max_steps=1000,
                        seed=a.seed)
    grpo.check_config(c)
    policy = checkpoint.build_model(hf_dir, None, "cpu", torch.float32).train()
    ref = checkpoint.build_model(hf_dir, None, "cpu", torch.float32).eval().requires_grad_(False) if beta else None
    tok = data.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    checkpoint.check_vocab(policy, tok)
    rng = random.Random(a.seed + 1)

    def random_scores(texts, examples, weights, **kw):  # stands in for rewards.score_batch: same signature
        total = [rng.random() for _ in texts]
        return total, {"accuracy": total, "format": [0.0] * len(texts), "language": [None] * len(texts)}, \
            collections.Counter()
    return SimpleNamespace(c=c, policy=policy, ref=ref, tok=tok, score=random_scores,
                           opt=optim.adamw(policy, c.lr, c.weight_decay, (c.beta1, c.beta2)),
                           sampler=tasks.PromptSampler(problems(a), c.seed))


def ours_step(s, step):
    """One step of grpo.run_loop (num_minibatches=1, mu=1: on-policy), with no stop ids so every completion has
    max_new_tokens tokens -> ({phase: seconds}, the rollout's Batch)."""
    c, template = s.c, data.TEMPLATES[s.c.template]
    t0 = time.perf_counter()
    with mock.patch.object(rewards, "score_batch", s.score):
        batch, stats = grpo.collect_rollout(s.policy, s.tok, s.sampler, c, step, template, stop_ids=[])
    t1 = time.perf_counter()
    optim.set_lr(s.opt, step, c)
    m = grpo.train_step(s.policy, s.ref, s.opt, batch, c, s.tok.vocab_size, on_policy=True)
    optim.update_router_bias(s.policy, optim.pop_expert_loads(s.policy), c.bias_update_rate)
    t2 = time.perf_counter()
    if not m["ok"]:
        raise RuntimeError(f"ours, step {step}: the update was skipped (non-finite loss or gradient)")
    gen = stats["sample_s"]
    return {"generate": gen, "score": t1 - t0 - gen, "train": t2 - t1, "total": t2 - t0}, batch


# ----------------------------------------------------------------------------------------------------------------
# TRL: its GRPOTrainer, timed from the inside


def trl_run(hf_dir, a, beta, after_step):
    """TRL's trainer.train() for 1 + reps steps; a callback times each optimizer step and then calls after_step(i)
    (our step, outside TRL's window). Phases come from wrapping three of the trainer's methods. -> (rows of
    {phase: seconds}, warm-up included; the set of completion lengths TRL produced; its policy's parameter count)"""
    import datasets
    import transformers
    import trl

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dir, "tokenizer.json"),
                                                  eos_token=EOT, pad_token=EOT)
    ours_tok = data.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    texts = [data.apply_template(data.TOY_TEMPLATE, e.prompt) for e in problems(a)]
    for t in texts:  # both sides must feed the model the same ids
        if hf_tok(t)["input_ids"] != data.prompt_ids(ours_tok, t):
            raise RuntimeError(f"tokenizers disagree on {t!r}")
    rng, out_dir = random.Random(a.seed + 2), tempfile.mkdtemp(prefix="bench_trl_")  # TRL's output_dir: stays empty

    def random_reward(completions, **kw):
        return [rng.random() for _ in completions]
    args = trl.GRPOConfig(  # TRL's defaults differ in bf16, gradient checkpointing, lr schedule, loss_type, optim
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"}, router_aux_loss_coef=0.0,
        # one rollout of P x G completions, one optimizer step on all of them in one micro-batch
        per_device_train_batch_size=len(texts) * a.group, gradient_accumulation_steps=1, num_generations=a.group,
        num_iterations=1, shuffle_dataset=False, max_steps=1 + a.reps,
        max_completion_length=a.new, generation_kwargs={"min_new_tokens": a.new}, temperature=1.0, top_p=1.0,
        top_k=0, learning_rate=a.lr, lr_scheduler_type="constant", optim="adamw_torch", adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        beta=beta, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=a.seed)
    trainer = trl.GRPOTrainer(model=hf_dir, reward_funcs=random_reward, args=args, processing_class=hf_tok,
                              train_dataset=datasets.Dataset.from_dict({"prompt": texts}))
    acc, rows, lengths = collections.Counter(), [], set()

    def timed(name, fn, counts=lambda args: True):
        def run(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            if counts(args):
                acc[name] += time.perf_counter() - t
            return out
        return run
    generate = timed("generate", trainer._generate)

    def generate_and_check(prompts):
        out = generate(prompts)
        lengths.update(len(ids) for ids in out[1])  # (prompt_ids, completion_ids, ...)
        return out
    trainer._generate = generate_and_check
    trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)
    trainer._get_per_token_logps_and_entropies = timed(
        "ref", trainer._get_per_token_logps_and_entropies, lambda args: args[0] is trainer.ref_model)

    class Interleave(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            acc.clear()
            acc["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - acc["t0"]
            gen, rollout, ref = acc["generate"], acc["rollout"], acc["ref"]
            rows.append({"generate": gen, "score": rollout - gen - ref, "train": total - rollout + ref,
                         "total": total})
            after_step(len(rows) - 1)
    trainer.add_callback(Interleave())
    torch.set_num_threads(a.threads)
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return rows, lengths, sum(p.numel() for p in trainer.model.parameters())


# ----------------------------------------------------------------------------------------------------------------


def run(a, hf_dir):
    """For each beta, fresh models on both sides and 1 + reps interleaved steps -> ({beta: {side: rows after the
    warm-up}}, {parameter counts, prompt lengths}). Raises unless every completion had exactly --new tokens."""
    results, info = {}, {}
    for beta in a.betas:
        s = ours_setup(hf_dir, a, beta)
        ours = []

        def step(i):
            times, b = ours_step(s, i)
            if set(b.comp_len.tolist()) != {a.new}:
                raise RuntimeError(f"ours: completion lengths {sorted(set(b.comp_len.tolist()))}, want {a.new}")
            ours.append(times)
        torch.set_num_threads(a.threads)
        if "trl" in a.sides:
            trl_rows, lengths, n_trl = trl_run(hf_dir, a, beta, step)
            if lengths != {a.new}:
                raise RuntimeError(f"TRL: completion lengths {sorted(lengths)}, want {a.new}")
            results[beta] = {"ours": ours[1:], "trl": trl_rows[1:]}
            info["trl_params"] = n_trl
        else:
            for i in range(1 + a.reps):
                step(i)
            results[beta] = {"ours": ours[1:]}
        info["ours_params"] = s.policy.num_params()
        info["prompt_len"] = sorted({len(data.prompt_ids(s.tok, e.prompt, data.TOY_TEMPLATE)) for e in problems(a)})
    return results, info


def report(a, results, info):
    trl_p = f", {info['trl_params'] / 1e6:.2f}M in transformers" if "trl_params" in info else ""
    print(f"GRPO step: {a.prompts} prompts x G={a.group} = {a.prompts * a.group} completions of exactly {a.new} new "
          f"tokens, prompts of {'/'.join(map(str, info['prompt_len']))} tokens; {info['ours_params'] / 1e6:.2f}M-param "
          f"MoE{trl_p} (vocab {VOCAB}), fp32 CPU, {torch.get_num_threads()} threads; lr {a.lr:g}, one optimizer step "
          f"per rollout; seconds, min / median of {a.reps} interleaved steps after 1 warm-up each")
    for beta, sides in results.items():
        print(f"\nbeta = {beta:g}{' (reference model on both sides)' if beta else ' (no reference model)'}")
        head = f"  {'phase':9s} {'ours min / median':>19s}"
        if "trl" in sides:
            head += f" {'TRL min / median':>19s} {'ours/TRL (median)':>18s} {'(min)':>6s}"
        print(head)
        for k in PHASES:
            om, on = median_min(sides["ours"], k)
            line = f"  {k:9s} {on:8.3f} / {om:8.3f}"
            if "trl" in sides:
                tm, tn = median_min(sides["trl"], k)
                line += f"  {tn:8.3f} / {tm:8.3f} {om / tm:17.3f}x {on / tn:6.3f}x"
            print(line)
        if "trl" in sides:
            r = median_min(sides["ours"], "total")[0] / median_min(sides["trl"], "total")[0]
            print(f"  total: ours / TRL = {r:.3f} (TRL {1 / r:.2f}x slower); goal <= 0.333: "
                  f"{'met' if r <= 1 / 3 else 'NOT met'}")


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub lookup
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "trl" in a.sides:
        import transformers
        transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, a.seed)
        results, info = run(a, d)
    report(a, results, info)


if __name__ == "__main__":
    main()
