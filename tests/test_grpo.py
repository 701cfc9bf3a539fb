import collections
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import config
import data
import grpo
import hf
import loss
import optim
import rollout
import tasks
import toy
from loss import group_advantages
from model import ModelConfig, Transformer


# ------------------------------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_hand_computed():
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    std = torch.tensor([1.0, 0, 0, 0]).std()  # unbiased: sqrt(0.25 * 4 / 3) = 0.5774
    assert torch.allclose(a, torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / std, atol=1e-6)
    assert a.sum().abs() < 1e-6
    b = group_advantages(torch.tensor([[2.0, 0.0], [5.0, 5.0]]), scale="none")
    assert b.tolist() == [[1.0, -1.0], [0.0, 0.0]]
    c = group_advantages(torch.tensor([[1.0, 0.0], [3.0, 1.0]]), scale="batch", eps=0.0)
    assert torch.allclose(c, torch.tensor([[0.5, -0.5], [1.0, -1.0]]) / torch.tensor([1.0, 0, 3, 1]).std())


@pytest.mark.parametrize("value", [0.1, 0.35, 1.0, 0.0, 1.1 + 0.2])
def test_constant_groups_get_exactly_zero(value):
    r = torch.full((3, 8), value, dtype=torch.float32)
    r[1] = r[1] + torch.tensor([0, 1e-7, 0, 0, 0, 0, 0, 0])  # fp32 residue: still a constant group
    for scale in ("group", "batch", "none"):
        a = group_advantages(r, scale=scale)
        assert torch.equal(a, torch.zeros_like(a)) and not torch.isnan(a).any()


def test_group_advantages_rejects_singleton_groups():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(4, 1))


def test_overlong_penalty_boundaries():
    # L_max = 20, buffer 4: no penalty up to 16, -1/4 at 17, -1 at 20 (PITFALLS P5)
    assert loss.overlong_penalty(16, 20, 4) == 0.0
    assert loss.overlong_penalty(17, 20, 4) == pytest.approx(-0.25)
    assert loss.overlong_penalty(20, 20, 4) == pytest.approx(-1.0)
    assert loss.overlong_penalty(20, 20, 0) == 0.0


# ------------------------------------------------------------------------------------------------------------------
# the loss on a tiny model


@pytest.fixture(scope="module")
def tok():
    return toy.toy_tokenizer(n_docs=2000)


def tiny(vocab, seed=0):
    cfg = ModelConfig(vocab_size=64 * ((vocab + 63) // 64), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2)
    torch.manual_seed(seed)
    return Transformer(cfg)


def cfg(**kw):
    base = dict(config.parse_config(grpo.GRPOConfig, ["--preset=cpu", "--init-from=x"], grpo.PRESETS).__dict__)
    base.update(grad_clip=1e9)  # inspect raw gradients
    base.update(kw)
    return grpo.GRPOConfig(**base)


def make_rows(n=8, seed=0, vocab=200, masked=()):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        P, L = 3 + i % 3, 2 + (i * 5) % 7  # ragged prompts and completions
        comp = torch.randint(0, vocab, (L,), generator=g).tolist()
        rows.append(dict(prompt=torch.randint(0, vocab, (P,), generator=g).tolist(), completion=comp,
                         sampler_logp=[0.0] * L, adv=float(torch.randn(1, generator=g)), masked=i in masked,
                         old_logp=None, experts=None, truncated=False))
    return rows


def batch(rows):
    """Test rows (dicts of lists) -> grpo.Batch, as collect_rollout builds it from the sampler's lists."""
    b = rollout.make_batch([r["prompt"] for r in rows], [r["completion"] for r in rows], [r["sampler_logp"] for r in rows],
                        [r["adv"] for r in rows], keep=[not r.get("masked") for r in rows],
                        truncated=[r.get("truncated", False) for r in rows])
    if rows[0].get("old_logp") is not None:
        b.old_logp = torch.zeros_like(b.sampler_logp)
        for i, r in enumerate(rows):
            b.old_logp[i, :len(r["old_logp"])] = torch.tensor(r["old_logp"])
    return b


def logprobs(model, rows, temperature, **kw):
    b = batch(rows)
    return grpo.token_logprobs(model, b, rollout.pack(b), 200, temperature, **kw)


def grads_of(model, rows, c, vocab=200, on_policy=True, ref=None):
    """Accumulate the step's gradient (without the optimizer update) and return a flat copy."""
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step is a no-op, the grads stay inspectable
    opt.zero_grad = lambda set_to_none=True: None
    m = grpo.train_step(model, ref, opt, batch(rows), c, vocab, on_policy)
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    return g, m


def test_on_policy_gradient_equals_reinforce():
    """mu=1: ratio == 1, so the loss gradient is -sum_i sum_t w_it A_i grad log p (PITFALLS P9)."""
    model = tiny(200)
    rows = make_rows()
    c = cfg(loss_agg="seq_mean_token_mean")
    g, m = grads_of(model, rows, c)
    assert m["clip_low"] == 0 and m["clip_high"] == 0
    model.zero_grad()
    logp = logprobs(model, rows, c.temperature)
    w = torch.tensor([1.0 / (len(r["completion"]) * len(rows)) * r["adv"] for r in rows
                      for _ in r["completion"]])
    (-(w * logp).sum()).backward()
    ref = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    assert torch.allclose(g, ref, atol=1e-7, rtol=1e-5) and g.abs().sum() > 0


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "dr_grpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_gradient_does_not_depend_on_micro_batching(agg, alpha):
    model = tiny(200)
    model.config.aux_loss_alpha = alpha  # the balance loss must split as exactly as the policy loss (P17)
    rows = make_rows(masked=(2,))
    g1, _ = grads_of(model, rows, cfg(loss_agg=agg, micro_batch_size=len(rows)))
    g4, _ = grads_of(model, rows, cfg(loss_agg=agg, micro_batch_size=2))
    assert torch.allclose(g1, g4, atol=1e-7, rtol=1e-5)


def test_micro_batches_are_cut_by_length():
    """Micro-batches come from the rows ordered by length: each is padded to near its own rows' length, not the
    rollout's longest. Same count as in rollout order, every row once, the gradient and pi_old unchanged."""
    model = tiny(200)
    rows = make_rows(n=9)
    b = batch(rows)
    total = b.prompt_len + b.comp_len  # (9,) 5..14 tokens, short and long rows interleaved
    chunks = loss.length_chunks(b, torch.arange(9), 4)
    assert len(chunks) == 3 and all(len(ch) <= 4 and torch.equal(ch, ch.sort().values) for ch in chunks)
    assert sorted(torch.cat(chunks).tolist()) == list(range(9))
    assert max(total[chunks[0]]) <= min(total[chunks[1]]) and max(total[chunks[1]]) <= min(total[chunks[2]])
    rows_in = torch.tensor([5, 1, 3])
    assert torch.equal(loss.length_chunks(b, rows_in, 4)[0], rows_in)  # one micro-batch: the rows as given
    # train_step runs those shapes: fewer padded positions than micro-batches taken in rollout order
    shapes, orig = [], model.logprobs
    model.logprobs = lambda tokens, *a, **kw: (shapes.append(tokens.shape), orig(tokens, *a, **kw))[1]
    g4, _ = grads_of(model, rows, cfg(micro_batch_size=4))
    padded = lambda parts: sum(len(p) * int(total[p].max() - 1) for p in parts)  # noqa: E731  inputs: P + L - 1
    assert sum(B * T for B, T in shapes) == padded(chunks) < padded(list(torch.arange(9).split(4)))
    del model.logprobs
    g1, _ = grads_of(model, rows, cfg(micro_batch_size=9))
    assert torch.allclose(g1, g4, atol=1e-7, rtol=1e-5)
    old1, old4 = (grpo.old_logprobs(model, b, cfg(micro_batch_size=n), 200) for n in (9, 4))
    inside = torch.arange(old1.shape[1]) < b.comp_len[:, None]
    assert torch.allclose(old1, old4, atol=1e-6) and (old1[inside] < 0).all() and (old4[~inside] == 0).all()


@pytest.mark.parametrize("mbs", [2, 8])
def test_skipping_zero_advantage_rows_leaves_the_gradient(mbs):
    """--skip-zero-adv runs only the kept rows with a non-zero advantage; the gradient and the loss are those of
    every row (the others add exactly 0), over 1 and several micro-batches."""
    model = tiny(200)
    rows = [{**r, "adv": 0.0 if i in (0, 3, 4, 7) else r["adv"]} for i, r in enumerate(make_rows(masked=(2,)))]
    g_all, m_all = grads_of(model, rows, cfg(micro_batch_size=mbs))
    g_skip, m_skip = grads_of(model, rows, cfg(micro_batch_size=mbs, skip_zero_adv=True))
    assert m_skip["rows_run"] == 3 and "rows_run" not in m_all  # rows 1, 5, 6 (2 is masked)
    assert torch.allclose(g_all, g_skip, atol=1e-7, rtol=1e-5) and g_skip.abs().sum() > 0
    assert m_skip["loss"] == pytest.approx(m_all["loss"], abs=1e-7)


def test_skipping_every_row_still_steps_adamw_exactly_as_unskipped():
    """No row with a gradient: no forward at all, yet AdamW steps on zeros as the unskipped step does (its moments
    decay, weight decay applies), so the two runs stay equal to the bit."""
    rows = [{**r, "adv": 0.0} for r in make_rows()]
    out = []
    for skip in (False, True):
        model = tiny(200)
        opt = optim.adamw(model, 1e-2, 0.1)
        model(torch.tensor([[1, 2, 3]])).pow(2).mean().backward()  # earlier moments: a step must decay them
        opt.step()
        opt.zero_grad(set_to_none=True)
        m = grpo.train_step(model, None, opt, batch(rows), cfg(skip_zero_adv=skip, grad_clip=1.0), 200, True)
        out.append((m, [p.detach().clone() for p in model.parameters()], opt.state_dict()["state"]))
    (m0, p0, s0), (m1, p1, s1) = out
    assert m1["rows_run"] == 0 and m1["tokens"] == 0 and m0["tokens"] > 0 and m1["ok"] and m1["grad_norm"] == 0
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert all(torch.equal(s0[i][k], s1[i][k]) for i in s0 for k in s0[i]) and s1[0]["step"] == 2


def test_clipping_zeroes_the_gradient_exactly_where_eq1_says():
    """Off-policy tokens with A > 0 and ratio > 1 + eps (or A < 0 and ratio < 1 - eps) give no gradient."""
    model = tiny(200)
    rows = make_rows(n=4)
    c = cfg(eps_low=0.2, eps_high=0.2)
    with torch.no_grad():
        lp = logprobs(model, rows, c.temperature).tolist()
    for r in rows:
        L = len(r["completion"])
        own, lp = lp[:L], lp[L:]
        # ratio = exp(logp - old): push every token far outside the clip range, on the side that clips
        r["old_logp"] = [x - 1.0 if r["adv"] > 0 else x + 1.0 for x in own]
    g, m = grads_of(model, rows, c, on_policy=False)
    assert g.abs().max() == 0
    assert m["clip_low"] + m["clip_high"] == sum(len(r["completion"]) for r in rows)
    for r in rows:  # the other side of each clip is not clipped: gradient flows
        r["old_logp"] = [x + 2.0 if r["adv"] > 0 else x - 2.0 for x in r["old_logp"]]
    g, m = grads_of(model, rows, c, on_policy=False)
    assert g.abs().max() > 0 and m["clip_low"] == 0 and m["clip_high"] == 0


def test_k3_kl_is_zero_at_the_reference_and_positive_away():
    model = tiny(200)
    rows = make_rows()
    c = cfg(beta=0.1)
    _, m = grads_of(model, rows, c, ref=copy.deepcopy(model))
    assert m["kl"] == 0.0
    other = tiny(200, seed=1)
    _, m = grads_of(model, rows, c, ref=other)
    assert m["kl"] > 0


def test_padding_never_changes_the_loss_or_gradient():
    """A row's gradient is the same alone or next to a longer row (more padding), and whatever id pads."""
    model = tiny(200)
    rows = make_rows(n=2)
    c = cfg(loss_agg="token_mean")
    g_both, _ = grads_of(model, rows, c)
    orig = rollout.pack
    # pad with another id, chosen by position (the valid mask), never by value (P3)
    rollout.pack = lambda b: (lambda x, v, *rest: (torch.where(v, x, torch.full_like(x, 7)), v, *rest))(*orig(b))
    try:
        g_pad7, _ = grads_of(model, rows, c)
    finally:
        rollout.pack = orig
    assert torch.allclose(g_both, g_pad7, atol=1e-7)
    # each row alone (its own padding), scaled to the joint token-mean normaliser, sums to the joint gradient
    n_tok = sum(len(r["completion"]) for r in rows)
    g_sum = sum(grads_of(model, [r], c)[0] * len(r["completion"]) / n_tok for r in rows)
    assert torch.allclose(g_both, g_sum, atol=1e-7, rtol=1e-5)


def test_masked_rows_leave_the_normaliser_and_all_masked_is_finite():
    model = tiny(200)
    rows = make_rows(n=4, masked=(1,))
    c = cfg(loss_agg="seq_mean_token_mean")
    w = loss.token_weights(batch(rows), c)
    assert w[1] == 0 and w[0] == pytest.approx(1 / (len(rows[0]["completion"]) * 3))
    everything = make_rows(n=3, masked=(0, 1, 2))
    g, m = grads_of(model, everything, c)
    assert torch.isfinite(g).all() and g.abs().max() == 0 and m["ok"]


# ------------------------------------------------------------------------------------------------------------------
# whole runs through main()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("base")
    model = tiny(tok.vocab_size)
    hf.save(model, str(d))
    tok.save(str(d / "tokenizer.bpe"))
    return str(d)


def run(base_dir, out, *extra):
    args = ["--preset=cpu", f"--init-from={base_dir}", f"--out-dir={out}", "--rollout-prompts=4", "--group-size=4",
            "--max-new-tokens=6", "--eval-every=0", "--task-size=64", "--micro-batch-size=8", "--sample-every=1",
            "--threads=1", *extra]
    return grpo.main(args)


def test_every_parameter_changes_after_one_step_and_none_without_signal(base_dir, tmp_path, monkeypatch):
    start = {k: v.clone() for k, v in hf.load(base_dir).state_dict().items()}

    def varied(completions, examples, weights=None, **kw):  # non-degenerate rewards: the share of digit chars
        r = [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in completions]
        return r, {"accuracy": r, "format": [0.0] * len(r), "language": [None] * len(r)}, {}
    monkeypatch.setattr(grpo.rewards, "score_batch", varied)
    p = run(base_dir, tmp_path / "a", "--max-steps=1", "--rollout-prompts=8", "--group-size=8",
            "--max-new-tokens=12")
    changed = {k: not torch.equal(v, start[k]) for k, v in p.state_dict().items() if k in dict(p.named_parameters())}
    assert all(changed.values()), [k for k, v in changed.items() if not v]

    def constant(completions, examples, weights=None, **kw):
        return [1.0] * len(completions), {"accuracy": [1.0] * len(completions), "format": [1.0] * len(completions),
                                          "language": [None] * len(completions)}, {}
    monkeypatch.setattr(grpo.rewards, "score_batch", constant)
    p = run(base_dir, tmp_path / "b", "--max-steps=1", "--beta=0", "--weight-decay=0")
    assert all(torch.equal(v, start[k]) for k, v in p.state_dict().items())
    # --skip-zero-adv: no row ran, so no per-token statistic exists (null, not a made-up 0)
    p = run(base_dir, tmp_path / "c", "--max-steps=1", "--weight-decay=0", "--skip-zero-adv")
    assert all(torch.equal(v, start[k]) for k, v in p.state_dict().items())
    line = json.loads(open(tmp_path / "c" / "metrics.jsonl").readline())
    assert line["rows_run"] == 0 and line["entropy"] is None and line["expert_imbalance"] is None
    assert line["grad_norm"] == 0


def test_skip_zero_adv_refuses_a_policy_with_a_balance_loss(base_dir, tmp_path, monkeypatch):
    build = checkpoint.build_model

    def with_balance_loss(*a, **kw):  # as a native checkpoint of an sft.py run with --aux-loss-alpha would load
        model = build(*a, **kw)
        model.config.aux_loss_alpha = 1e-3  # its gradient reaches every output, whatever the advantage
        return model
    monkeypatch.setattr(grpo.checkpoint, "build_model", with_balance_loss)
    with pytest.raises(config.ConfigError, match="--skip-zero-adv: .* has a balance loss"):
        run(base_dir, tmp_path / "out", "--max-steps=1", "--skip-zero-adv")


def test_resume_equals_uninterrupted_run(base_dir, tmp_path):
    # 8 training prompts, 4 per step: the step-2 checkpoint sits exactly on an epoch boundary (verl PR #5725)
    full = run(base_dir, tmp_path / "full", "--max-steps=4", "--ckpt-every=2", "--task-size=8")
    run(base_dir, tmp_path / "part", "--max-steps=2", "--ckpt-every=2", "--task-size=8")
    assert checkpoint.load_checkpoint(str(tmp_path / "part"))["sampler"] == (0, 8)  # epoch 0 used up, exactly
    # a new process would see only the files; a second main() call is the same thing here
    resumed = run(base_dir, tmp_path / "part", "--max-steps=4", "--ckpt-every=2", "--resume", "--task-size=8")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    a = torch.load(checkpoint.latest_checkpoint(str(tmp_path / "full")), weights_only=False)
    b = torch.load(checkpoint.latest_checkpoint(str(tmp_path / "part")), weights_only=False)
    assert a["step"] == b["step"] == 4 and a["sampler"] == b["sampler"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    lines = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(base_dir, tmp_path):
    run(base_dir, tmp_path / "r", "--max-steps=1", "--ckpt-every=1")
    code = (f"import sys, os, torch; sys.path.insert(0, {os.getcwd()!r}); import grpo\n"
            f"orig = torch.save\n"
            f"def dying(obj, f):\n"
            f"    orig(obj, f); f.flush(); os._exit(9)  # killed after writing, before the rename\n"
            f"torch.save = dying\n"
            f"grpo.main(['--preset=cpu', '--init-from={base_dir}', '--out-dir={tmp_path / 'r'}', '--resume',\n"
            f"           '--max-steps=2', '--rollout-prompts=4', '--group-size=4', '--max-new-tokens=6',\n"
            f"           '--eval-every=0', '--task-size=64', '--threads=1', '--ckpt-every=1'])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(grpo.__file__), capture_output=True)
    assert r.returncode == 9, r.stderr.decode()[-2000:]
    assert checkpoint.load_checkpoint(str(tmp_path / "r"))["step"] == 1
    p = run(base_dir, tmp_path / "r", "--max-steps=2", "--ckpt-every=1", "--resume")
    assert checkpoint.load_checkpoint(str(tmp_path / "r"))["step"] == 2 and p is not None


@pytest.mark.parametrize("argv, needle", [
    (["--group-size=1"], "--group-size: GRPO needs at least 2"),
    (["--num-minibatches=3"], "--num-minibatches: must divide"),
    (["--eps-low=-0.1"], "--eps-low: must be >= 0"),
    (["--eps-high=-0.1"], "--eps-high: must be >= 0"),
    (["--top-p=0.9"], "--top-p: top-p/top-k sampling"),
    (["--top-k=5"], "--top-k: top-p/top-k sampling"),
    (["--max-steps=3", "--num-minibatches=2"], "--max-steps: must be a multiple of num_minibatches"),
    (["--lr-schedule=linear"], "--lr-schedule='linear': must be one of constant, cosine"),
    (["--loss-agg=sum"], "--loss-agg='sum': must be one of"),
    (["--template=chat"], "--template='chat': must be one of r1_zero, toy, none"),
    (["--skip-zero-adv", "--beta=0.04"], "--skip-zero-adv: needs --beta=0"),
    (["--skip-zero-adv", "--entropy-coef=0.01"], "--skip-zero-adv: needs --beta=0 .* and --entropy-coef=0"),
])
def test_invalid_settings_fail_at_start(argv, needle, base_dir):
    with pytest.raises(config.ConfigError, match=needle):
        grpo.main(["--preset=cpu", f"--init-from={base_dir}", *argv])


def test_tiny_run_raises_its_reward(base_dir, tmp_path, monkeypatch):
    """TinyZero-style smoke test: a random tiny policy learns to emit more digits when digits are rewarded."""
    def digits(completions, examples, weights=None, **kw):
        r = [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in completions]
        return r, {"accuracy": r, "format": [0.0] * len(r), "language": [None] * len(r)}, {}
    monkeypatch.setattr(grpo.rewards, "score_batch", digits)
    run(base_dir, tmp_path / "smoke", "--max-steps=40", "--lr=1e-2", "--rollout-prompts=8", "--group-size=8",
        "--max-new-tokens=8", "--micro-batch-size=64")
    rewards = [json.loads(l)["reward"] for l in open(tmp_path / "smoke" / "metrics.jsonl")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, (first, last)


def test_trainer_logprobs_equal_the_samplers_at_the_sampling_temperature():
    """PITFALLS P1/P2 end to end: rows built from a T=0.6 rollout go through train_step at T=0.6 and its logged
    sampler-trainer gap is ~0; the trainer's log-probs at T=1 instead would not match (the negative control)."""
    model = tiny(200)
    with torch.no_grad():  # sharper logits than the init, so the temperature matters
        model.lm_head.weight.mul_(30)
    prompts = [[5, 17, 42], [7, 8]]
    out = rollout.generate(model, prompts, max_new_tokens=6, temperature=0.6, num_samples=4, seed=0, vocab_size=200)
    rows = [dict(prompt=prompts[i // 4], completion=out.tokens[i], sampler_logp=out.logprobs[i], masked=False,
                 adv=1.0 if i % 2 else -1.0, old_logp=None, experts=None, truncated=out.truncated[i])
            for i in range(8)]
    _, m = grads_of(model, rows, cfg(temperature=0.6))
    assert m["tokens"] == 48 and m["gap"] / m["tokens"] < 1e-5
    sampler = torch.tensor([x for r in rows for x in r["sampler_logp"]])
    with torch.no_grad():
        assert (logprobs(model, rows, 0.6) - sampler).abs().max() < 1e-4
        assert (logprobs(model, rows, 1.0) - sampler).abs().max() > 1e-2


def test_the_balance_loss_reaches_the_step_gradient_exactly_once():
    """PITFALLS P17: with alpha > 0 the step's gradient gains exactly the gradient of the balance loss of one forward
    over the whole mini-batch (the micro-batching test alone would pass if train_step dropped the term)."""
    model = tiny(200)
    rows = make_rows(masked=(2,))
    c = cfg(micro_batch_size=3)  # three micro-batches of 3, 3, 2 rows
    g0, _ = grads_of(model, rows, c)
    model.config.aux_loss_alpha = 0.1
    g1, _ = grads_of(model, rows, c)
    model.zero_grad(set_to_none=True)
    x, valid, *_ = rollout.pack(batch(rows))
    model(x, valid=valid, return_hidden=True)
    model.aux_loss().backward()
    g_aux = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    assert g_aux.abs().sum() > 0
    assert torch.allclose(g1 - g0, g_aux, atol=1e-7, rtol=1e-4)


def test_token_weights_closed_form():
    """PITFALLS P8: the per-token weight of each aggregation, by hand (row 1 masked, max_new_tokens 8)."""
    rows = [dict(prompt=[1], completion=[0] * L, sampler_logp=[0.0] * L, adv=0.0, masked=i == 1)
            for i, L in enumerate([2, 3, 5, 4])]
    want = {"seq_mean_token_mean": [1 / 6, 0, 1 / 15, 1 / 12], "token_mean": [1 / 11, 0, 1 / 11, 1 / 11],
            "dr_grpo": [1 / 24, 0, 1 / 24, 1 / 24]}
    for agg, w in want.items():
        got = loss.token_weights(batch(rows), cfg(loss_agg=agg, max_new_tokens=8)).tolist()
        assert got == pytest.approx(w, abs=1e-12)


def test_entropy_and_kl_metrics_are_per_token_means():
    """PITFALLS P21: nano-aha-moment divided its entropy by the token count twice; check ours against a direct sum."""
    model = tiny(200)
    rows = make_rows()
    ref = tiny(200, seed=1)
    _, m = grads_of(model, rows, cfg(beta=0.1), ref=ref)
    with torch.no_grad():
        lp, ent = logprobs(model, rows, 1.0, entropy=True)
        ref_lp = logprobs(ref, rows, 1.0)
    keep = torch.tensor([not r["masked"] for r in rows for _ in r["completion"]])
    d = ref_lp - lp
    assert m["tokens"] == int(keep.sum())
    assert m["entropy"] / m["tokens"] == pytest.approx(ent[keep].mean().item(), rel=1e-5)
    assert m["kl"] / m["tokens"] == pytest.approx((torch.exp(d) - d - 1)[keep].mean().item(), rel=1e-5)
    assert 0 < m["entropy"] / m["tokens"] <= torch.log(torch.tensor(200.0)).item()
    # and what log_step writes to metrics.jsonl is the same per-token mean (divided once, not twice)
    logged = {}
    log = type("Log", (), {"log": lambda self, met, step: logged.update(met)})()
    b = batch(rows)
    b.scores, b.texts = torch.tensor([[0.0, 0.0, 1.0, float("nan")]] * len(rows), dtype=torch.float64), ["x"] * len(rows)
    stats = {"refills": 0, "zero_std_groups": 0, "sampled_groups": 1, "new_tokens": 1, "sample_s": 1.0,
             "reasons": __import__("collections").Counter()}
    grpo.log_step(log, 1, b, m, stats, None, 1e-4, 1.0, 1.0, cfg(beta=0.1, sample_every=0), None)
    assert logged["entropy"] == pytest.approx(ent[keep].mean().item(), rel=1e-5)
    assert logged["kl"] == pytest.approx((torch.exp(d) - d - 1)[keep].mean().item(), rel=1e-5)
    k3 = torch.exp(d) - d - 1  # tiny random models stay far below the k3 cap; the logged share says so
    assert (k3[keep] < 10).all() and logged["kl_capped"] == 0.0


def test_capped_kl_tokens_are_counted_through_train_step():
    """A reference far from the policy (a sharpened head): some tokens reach the k3 cap; train_step counts exactly
    those, and their KL term adds no gradient."""
    from kernels.grpo_loss import K3_MAX
    model, rows, ref = tiny(200), make_rows(), tiny(200, seed=1)
    with torch.no_grad():
        ref.lm_head.weight.mul_(40.0)
        lp = logprobs(model, rows, 1.0)
        ref_lp = logprobs(ref, rows, 1.0)
    keep = torch.tensor([not r["masked"] for r in rows for _ in r["completion"]])
    d = (ref_lp - lp).double()
    capped = ((d.clamp(max=30).exp() - d - 1) > K3_MAX) & keep
    assert 0 < int(capped.sum()) < int(keep.sum())
    _, m = grads_of(model, rows, cfg(beta=0.1), ref=ref)
    assert m["kl_capped"] == int(capped.sum())
    assert m["kl"] == pytest.approx(torch.where(capped, K3_MAX, d.exp() - d - 1)[keep].sum().item(), rel=1e-4)


def test_mini_batches_and_mu_two_freeze_old_logprobs_and_clip(base_dir, tmp_path, monkeypatch):
    """num_minibatches=2, mu=2 (4 updates per rollout): old log-probs are computed once before the first update and
    never change; later updates are off-policy, so ratios leave 1 and clipping happens (PITFALLS P9)."""
    seen = {}
    orig = grpo.train_step

    def spy(policy, ref, opt, b, c, vocab, on_policy):
        assert not on_policy
        for tokens, old in zip(b.tokens.tolist(), b.old_logp.tolist()):  # outputs keyed by their tokens
            seen.setdefault(tuple(tokens), []).append(old)
        return orig(policy, ref, opt, b, c, vocab, on_policy)

    def digits(completions, examples, weights=None, **kw):
        r = [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in completions]
        return r, {"accuracy": r, "format": [0.0] * len(r), "language": [None] * len(r)}, {}
    monkeypatch.setattr(grpo, "train_step", spy)
    monkeypatch.setattr(grpo.rewards, "score_batch", digits)
    run(base_dir, tmp_path / "mu2", "--max-steps=4", "--num-minibatches=2", "--mu=2", "--lr=3e-2", "--eps-low=0.05",
        "--eps-high=0.05", "--rollout-prompts=4", "--group-size=4")
    # 16 outputs, each in two updates (identical outputs share a key), with the same frozen old log-probs each time
    assert sum(len(v) for v in seen.values()) == 32 and all(v.count(v[0]) == len(v) for v in seen.values())
    rows = [json.loads(l) for l in open(tmp_path / "mu2" / "metrics.jsonl")]
    assert rows[0]["clip_low"] + rows[0]["clip_high"] == 0  # the first update is on the frozen policy: ratio 1
    assert max(r["clip_low"] + r["clip_high"] for r in rows[1:]) > 0


def test_resume_mid_run_with_reference_and_two_minibatches(base_dir, tmp_path):
    """P19 with the reference model's state and several updates per rollout: resume equals the straight run."""
    extra = ["--ckpt-every=2", "--num-minibatches=2", "--beta=0.05", "--ref-refresh-every=3", "--lr=1e-2"]
    full = run(base_dir, tmp_path / "full", "--max-steps=4", *extra)
    run(base_dir, tmp_path / "part", "--max-steps=2", *extra)
    resumed = run(base_dir, tmp_path / "part", "--max-steps=4", "--resume", *extra)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    a, b = (checkpoint.load_checkpoint(str(tmp_path / d)) for d in ("full", "part"))
    assert a["has_ref"] and all(torch.equal(v, b["ref"][k]) for k, v in a["ref"].items())


def test_dynamic_sampling_refills_and_batch_scale(base_dir, tmp_path, monkeypatch):
    calls = []

    def half_constant(completions, examples, weights=None, **kw):  # every other group has no reward variance
        calls.append(len(completions))
        r = [float(i % 4 == 0) if (i // 4) % 2 == 0 else 1.0 for i in range(len(completions))]
        return r, {"accuracy": r, "format": [0.0] * len(r), "language": [None] * len(r)}, {}
    monkeypatch.setattr(grpo.rewards, "score_batch", half_constant)
    run(base_dir, tmp_path / "ds", "--max-steps=1", "--dynamic-sampling", "--max-refills=5", "--adv-scale=batch",
        "--rollout-prompts=4", "--group-size=4")
    assert calls[:3] == [16, 8, 4]  # 4 prompts, 2 kept; refill 2, 1 kept; refill 1 ...
    row = json.loads(open(tmp_path / "ds" / "metrics.jsonl").readline())
    assert row["refills"] == 2 and row["frac_reward_zero_std"] == pytest.approx(3 / 7)  # 2 + 1 + 0 of 4 + 2 + 1


def test_routing_replay_trains(base_dir, tmp_path):
    run(base_dir, tmp_path / "rr", "--max-steps=2", "--routing-replay")
    rows = [json.loads(l) for l in open(tmp_path / "rr" / "metrics.jsonl")]
    assert rows[0]["sampler_trainer_gap"] < 1e-4  # the trainer used the sampler's experts: log-probs agree


def test_duplicate_prompts_in_one_rollout_stay_separate_groups(monkeypatch):
    """PITFALLS P7: groups are the G rows each prompt was sampled into (row i -> prompt i // G), never keyed by the
    prompt text, so the same prompt twice in a rollout makes two groups with their own mean and std."""
    tok = toy.toy_tokenizer(n_docs=200)
    ex = data.Example(prompt="1+2", answer="3", kind="math")
    G = 4

    def fake_generate(policy, prompts, *a, num_samples, **kw):
        toks = [[5, 6]] * (len(prompts) * num_samples)
        return rollout.Rollout(tokens=toks, logprobs=[[0.0, 0.0]] * len(toks), truncated=[False] * len(toks),
                               num_samples=num_samples)

    def scores(completions, examples, weights=None, **kw):
        r = [1.0, 0.0, 1.0, 0.0] + [1.0] * 4  # the first copy has signal, the second is constant
        return r, {"accuracy": r, "format": [0.0] * 8, "language": [None] * 8}, {}
    monkeypatch.setattr(grpo.rollout, "generate", fake_generate)
    monkeypatch.setattr(grpo.rewards, "score_batch", scores)
    c = grpo.GRPOConfig(group_size=G, template="none")
    stats = {"sample_s": 0.0, "new_tokens": 0, "zero_std_groups": 0, "sampled_groups": 0,
             "reasons": __import__("collections").Counter()}
    got, zero = grpo.score_round(None, tok, [ex, ex], c, 0, 0, "", [tok.eot_id], stats)
    adv = got["adv"]
    assert zero == [False, True] and adv[4:] == [0.0] * 4
    assert adv[:4] == pytest.approx([0.866, -0.866, 0.866, -0.866], abs=1e-3)  # (r - 0.5) / std(ddof=1)


def test_score_round_adds_the_overlong_penalty_and_masks_truncated_rows(monkeypatch):
    """PITFALLS P5 wiring: the soft overlong penalty is added to each row's reward before the group advantages, and
    --mask-truncated marks exactly the truncated rows (max_new_tokens 6, buffer 2: lengths 2, 5, 6, 6 get
    0, -0.5, -1, -1)."""
    tok = toy.toy_tokenizer(n_docs=200)
    lens, trunc = [2, 5, 6, 6], [False, False, False, True]
    monkeypatch.setattr(grpo.rollout, "generate", lambda policy, prompts, *a, **kw: rollout.Rollout(
        tokens=[[5] * L for L in lens], logprobs=[[0.0] * L for L in lens], truncated=trunc, num_samples=4))
    monkeypatch.setattr(grpo.rewards, "score_batch", lambda completions, examples, weights=None, **kw: (
        [0.0] * 4, {"accuracy": [0.0] * 4, "format": [0.0] * 4, "language": [None] * 4}, {}))
    c = grpo.GRPOConfig(group_size=4, template="none", max_new_tokens=6, overlong_buffer=2, mask_truncated=True)
    stats = {"sample_s": 0.0, "new_tokens": 0, "zero_std_groups": 0, "sampled_groups": 0,
             "reasons": __import__("collections").Counter()}
    got, zero = grpo.score_round(None, tok, [data.Example(prompt="1+2", answer="3")], c, 0, 0, "", [tok.eot_id],
                                 stats)
    want = group_advantages(torch.tensor([[0.0, -0.5, -1.0, -1.0]]))[0].tolist()
    assert got["adv"] == pytest.approx(want) and zero == [False]
    assert [not k for k in got["keep"]] == trunc
    assert rollout.make_batch(**got).keep.tolist() == [not t for t in trunc]
    c.mask_truncated = False
    got, _ = grpo.score_round(None, tok, [data.Example(prompt="1+2", answer="3")], c, 0, 0, "", [tok.eot_id], stats)
    assert all(got["keep"])


def test_a_group_whose_gold_cannot_be_judged_does_not_train(monkeypatch):
    """An unparseable gold gives accuracy None; its group used to train on the format reward alone. Real rewards:
    the completions differ in format only, so without the fix the group would get non-zero advantages."""
    tok = toy.toy_tokenizer(n_docs=200)
    texts = ["<think>a</think><answer>1</answer>", "no tags", "<think>b</think><answer>2</answer>", "x"]
    monkeypatch.setattr(grpo.rollout, "generate", lambda policy, prompts, *a, num_samples, **kw: rollout.Rollout(
        tokens=[tok.encode(t) for t in texts] * len(prompts), logprobs=[[0.0] * len(tok.encode(t)) for t in texts] *
        len(prompts), truncated=[False] * 4 * len(prompts), num_samples=num_samples))
    c = grpo.GRPOConfig(group_size=4, template="none", reward_workers=0)
    stats = {"sample_s": 0.0, "new_tokens": 0, "zero_std_groups": 0, "sampled_groups": 0,
             "reasons": __import__("collections").Counter()}
    bad, good = data.Example(prompt="q", answer="\\frac{1}{"), data.Example(prompt="q", answer="1")
    got, zero = grpo.score_round(None, tok, [bad, good], c, 0, 0, "", [tok.eot_id], stats)
    acc, fmt = [s[1] for s in got["scores"][:4]], [s[2] for s in got["scores"][:4]]
    assert all(math.isnan(a) for a in acc) and fmt == [1.0, 0.0, 1.0, 0.0]  # accuracy nan: not judged
    assert got["adv"][:4] == [0.0] * 4 and zero == [True, False]
    assert any(a != 0 for a in got["adv"][4:]) and stats["reasons"]["unjudged_example"] == 1


def test_answer_outside_the_answer_block_does_not_count():
    """With a template that asks for <answer></answer>, a \\boxed{} inside <think> or in a truncated output is no
    answer; without one (a boxed-answer model) it still is."""
    import rewards
    ex = data.Example(prompt="q", answer="42")
    texts = ["<think>so \\boxed{42}", "<think>\\boxed{42}</think><answer>41</answer>",
             "<think>x</think><answer>\\boxed{42}</answer>"]
    _, comps, _ = rewards.score_batch(texts, [ex] * 3, workers=0, answer_block=True)
    assert comps["accuracy"] == [0.0, 0.0, 1.0]
    _, comps, _ = rewards.score_batch(texts, [ex] * 3, workers=0, answer_block=False)
    assert comps["accuracy"] == [1.0, 0.0, 1.0]
    assert rewards.extract_answer(texts[0], answer_block=True) is None


def test_beta_zero_never_builds_a_reference_model(base_dir, tmp_path, monkeypatch):
    """PITFALLS P11: beta = 0 loads the policy only; beta > 0 loads a second (reference) model."""
    built = []
    orig = checkpoint.build_model
    monkeypatch.setattr(grpo.checkpoint, "build_model", lambda *a, **kw: built.append(1) or orig(*a, **kw))
    run(base_dir, tmp_path / "b0", "--max-steps=1", "--beta=0")
    assert len(built) == 1
    run(base_dir, tmp_path / "b1", "--max-steps=1", "--beta=0.01")
    assert len(built) == 3


def test_bf16_run_end_to_end(base_dir, tmp_path, monkeypatch):
    """--dtype=bf16 in one process (autocast over fp32 master weights): the sampler's fp32 head and the trainer's
    kernel agree (PITFALLS M8), the update is finite and reaches every parameter."""
    start = {k: v.clone() for k, v in hf.load(base_dir).named_parameters()}

    def varied(completions, examples, weights=None, **kw):
        r = [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in completions]
        return r, {"accuracy": r, "format": [0.0] * len(r), "language": [None] * len(r)}, {}
    monkeypatch.setattr(grpo.rewards, "score_batch", varied)
    args = ["--max-steps=1", "--rollout-prompts=8", "--group-size=8", "--max-new-tokens=12", "--dtype=bf16"]
    p = run(base_dir, tmp_path / "bf16", *args)
    row = json.loads(open(tmp_path / "bf16" / "metrics.jsonl").readlines()[-1])
    assert row["skipped_steps"] == 0 and 0 < row["grad_norm"] < float("inf")
    # control: the same run with the sampler's logits rounded to bf16 (the bug) has a much larger gap
    # (here 2.5e-5 vs 2.6e-4; most of the rest is cached vs full-forward bf16 hidden states)
    monkeypatch.setattr(grpo.rollout, "head_logits",
                        lambda h, w, V: (h.bfloat16() @ w.bfloat16().T)[:, :V].float())
    run(base_dir, tmp_path / "rounded", *args)
    rounded = json.loads(open(tmp_path / "rounded" / "metrics.jsonl").readlines()[-1])
    assert row["sampler_trainer_gap"] < rounded["sampler_trainer_gap"] / 3
    params = dict(p.named_parameters())
    assert all(params[k].dtype == torch.float32 for k in start)  # master weights stay fp32
    assert all(not torch.equal(params[k], v) for k, v in start.items())


def test_every_entry_point_encodes_prompts_with_the_tokenizers_bos(monkeypatch, tmp_path):
    """grpo.py (rollout prompts), eval.py (sampling and the probe) and sft.py (prompt/completion rows) all encode a
    prompt through data.prompt_ids: a tokenizer that adds a BOS gets it at position 0 everywhere."""
    import eval as ev
    import sft
    base = data.Tokenizer.train(toy.toy_corpus(300), toy.TOY_VOCAB_SIZE)  # with the R1 tags as special tokens
    tok = data.Tokenizer(base.enc, bos="<think>")  # any special token will do as the BOS here
    exs = toy.toy_problems(3, "dev", seed=0)
    want = [tok.special["<think>"]] + base.encode(data.apply_template(data.TOY_TEMPLATE, exs[0].prompt))

    class Seen(Exception):
        pass

    def capture(model, prompts, *a, **k):
        raise Seen(prompts)
    monkeypatch.setattr(rollout, "generate", capture)
    with pytest.raises(Seen) as e:
        grpo.score_round(None, tok, exs, cfg(template="toy"), 1, 0, data.TOY_TEMPLATE, [tok.eot_id], {})
    assert e.value.args[0][0] == want
    model = torch.nn.Linear(1, 1)
    model.config = __import__("types").SimpleNamespace(eos_token_id=None)
    with pytest.raises(Seen) as e:
        ev.evaluate(model, tok, exs, k=1, template=data.TOY_TEMPLATE, workers=0)
    assert e.value.args[0][0] == want
    p = tmp_path / "sft.jsonl"
    p.write_text(json.dumps({"prompt": "User: 1\nAssistant:", "completion": "<answer>1</answer>"}) + "\n")
    rows = sft.load_pairs(str(p), tok, sft.SFTConfig())
    assert rows[0][0] == [tok.special["<think>"]] + base.encode("User: 1\nAssistant:")


def test_prompt_sampler_epochs_and_resumable_cursor():
    exs = list(range(10))
    s = tasks.PromptSampler(exs, seed=3)
    first = s.take(4) + s.take(4) + s.take(4)  # crosses into epoch 1
    assert sorted(first[:10]) == exs and s.epoch == 1 and s.pos == 2
    again = tasks.PromptSampler(exs, seed=3, epoch=s.epoch, pos=s.pos)
    assert again.take(5) == s.take(5)  # a resumed cursor continues the same order


def test_all_scenario_rl_general_prompts_from_the_late_switch(base_dir, tmp_path, monkeypatch):
    """General prompts join rollouts from --general-from-step on; their reward is the reward models' scores plus the
    format reward, not the rule rewards; the toy's hidden rule and the reward models' means are logged; resume
    continues the general prompts' cursor."""
    import reward_model
    import toy
    seen, scored = [], []
    real_round = grpo.score_round

    def spy_round(policy, tok, exs, c, step, *a, **kw):
        seen.append((step, sum(e.kind == "general" for e in exs), len(exs)))
        return real_round(policy, tok, exs, c, step, *a, **kw)

    def fake_scores(model, seqs, eot_id):  # a reward model that likes long inputs, to see it in the total
        scored.append((model.tag, len(seqs)))
        return torch.tensor([float(len(s)) for s in seqs])
    monkeypatch.setattr(grpo, "score_round", spy_round)
    monkeypatch.setattr(reward_model, "reward_scores", fake_scores)
    real_build = grpo.checkpoint.build_model

    def tagged(path, *a, **kw):
        m = real_build(path, *a, **kw)
        m.tag = "rm" if "--rm" in str(a) else "policy"
        return m
    monkeypatch.setattr(grpo.checkpoint, "build_model", tagged)
    common = ["--general-frac=0.5", "--general-from-step=2", f"--rm-helpful={base_dir}", f"--rm-harmless={base_dir}",
              "--ckpt-every=2"]
    run(base_dir, tmp_path / "a", "--max-steps=4", *common)
    assert [g for _, g, _ in seen] == [0, 0, 2, 2] and all(n == 4 for _, _, n in seen)
    assert sorted(set(scored)) == [("rm", 8)]  # 2 general prompts x G=4, each reward model once per rollout
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert all("rm_helpful" not in r for r in rows[:2])
    for r in rows[2:]:
        assert r["general_outputs"] == 8 and r["rm_helpful"] > 0 and r["rm_harmless"] > r["rm_helpful"]
        assert 0 <= r["hidden_helpful"] <= 1 and 0 <= r["hidden_harmless"] <= 1
    # resume from step 2 gives the same general prompts and metrics as the uninterrupted run
    seen.clear()
    run(base_dir, tmp_path / "b", "--max-steps=2", *common)
    run(base_dir, tmp_path / "b", "--max-steps=4", "--resume", *common)
    b = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    drop = ("elapsed_s", "train_tok_s", "sample_tok_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in b] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows]
    # the rewards of a general output: reward models + format, never accuracy
    c = cfg(format_weight=1.0)
    ex = toy.general_prompts("train")[0]
    sums = collections.defaultdict(float)

    class RM:
        config = type("C", (), {"max_position_embeddings": 64})()
        tag = "rm"
    tok = data.Tokenizer.from_file(os.path.join(base_dir, "tokenizer.bpe"))
    good = toy.general_reply(ex)
    total, fmt = reward_model.general_rewards(tok, [good, "junk"], [ex, ex], {"helpful": RM()}, c.format_weight, sums)
    lens = [len(reward_model.reward_ids(tok, ex.prompt, v, 64)) for v in (toy.reply_of(good), "")]
    assert fmt == [1.0, 0.0] and total == [1.0 + lens[0], 0.0 + lens[1]]
    assert sums["hidden_helpful"] == 1.0 and sums["outputs"] == 2
    with pytest.raises(config.ConfigError, match="--general-frac"):
        run(base_dir, tmp_path / "c", "--general-frac=0.5")
