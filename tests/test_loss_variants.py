"""The GRPO loss variants (loss.py; each one flag in grpo.GRPOConfig, off by default): GSPO's sequence-level ratio,
TIS and MIS against the sampler's log-probs, the k1/k2/k3 KL estimators, the KL as a reward penalty, an entropy
bonus. Each against a float64 hand computation written here (values and d loss / d logp), each setting that reduces
to the default loss against today's loss bit for bit, and each flag through a short run."""
import collections
import json
import math
import os
import sys

import pytest
import torch

import config
import data
import grpo
import kernels
import loss
import rollout
import toy
from loss import group_advantages
from test_distributed import ROOT, torchrun
from test_grpo import base_dir, batch, cfg, grads_of, logprobs, make_rows, run, tiny, tok  # noqa: F401 (fixtures)


def today_loss(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, beta):
    """loss.grpo_loss as it was before the variants (main at 65ec701), verbatim: the bit-for-bit reference."""
    keep, zero = mask != 0, torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp, a = torch.where(keep, logp, zero), torch.where(keep, adv, zero)
    ratio = torch.exp(lp - (lp.detach() if old_logp is None else torch.where(keep, old_logp, zero)))
    loss_ = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    kl, capped = torch.zeros_like(lp), torch.zeros_like(lp, dtype=torch.bool)
    if ref_logp is not None:
        d = torch.where(keep, ref_logp, zero) - lp
        k3 = torch.exp(d.clamp(max=30.0)) - d - 1
        capped = keep & (k3 > loss.K3_MAX)
        kl = torch.where(capped, torch.full_like(k3, loss.K3_MAX), k3)
        if beta != 0:
            loss_ = loss_ + beta * kl
    loss_ = torch.where(keep, loss_ * mask, zero)
    r = ratio.detach()
    return loss_, kernels.GRPOTokenStats(
        (keep & (a < 0) & (r < 1 - eps_low)).to(logp.dtype), (keep & (a > 0) & (r > 1 + eps_high)).to(logp.dtype),
        torch.where(keep, kl.detach(), zero), capped.to(logp.dtype))


LENS = (3, 1, 4, 2, 5, 3)  # ragged outputs; token 4 and the whole output 3 (tokens 8, 9) are masked
EPS = 0.1


def inputs(dtype=torch.float64, seed=0, lens=LENS, masked=(4, 8, 9)):
    """Flat per-token inputs of several outputs: rows (N,), logp (leaf), old, ref, sampler, adv (per output), mask.
    Masked tokens carry inf/nan garbage, as padding may."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    N = len(rows)
    logp = -3 * torch.rand(N, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    ref = logp + torch.randn(N, generator=g, dtype=torch.float64)
    ref[0] = logp[0] + 4.0  # k3 = e^4 - 5 > 10: capped
    sampler = old + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    adv = torch.randn(len(lens), generator=g, dtype=torch.float64)[rows]
    mask = torch.ones(N, dtype=torch.bool)
    mask[list(masked)] = False
    for x, bad in ((logp, float("nan")), (old, float("inf")), (ref, float("-inf")), (sampler, float("nan"))):
        x[list(masked)] = bad
    cast = lambda x: x.to(dtype)  # noqa: E731
    return dict(rows=rows, logp=cast(logp).requires_grad_(), old=cast(old), ref=cast(ref), sampler=cast(sampler),
                adv=cast(adv), mask=mask)


def weights(x):
    """Per-token step weights (as token_weights gives), fixed and positive."""
    return torch.linspace(0.5, 1.5, len(x["rows"]), dtype=x["logp"].dtype)


def value_and_grad(x, **kw):
    """(per-token loss, stats, d sum(w * loss) / d logp) of loss.grpo_loss on inputs x."""
    args = dict(old_logp=x["old"], ref_logp=None, beta=0.0, eps_low=EPS, eps_high=EPS)
    args.update(kw)
    lt, st = loss.grpo_loss(x["logp"], args.pop("old_logp"), args.pop("ref_logp"), x["adv"], x["mask"],
                            args.pop("eps_low"), args.pop("eps_high"), args.pop("beta"), **args)
    g, = torch.autograd.grad((lt * weights(x)).sum(), x["logp"], allow_unused=True)
    return lt, st, torch.zeros_like(x["logp"]) if g is None else g


def token_by_hand(lp, old, A):
    """Today's per-token term by hand: (-min(r A, clip(r) A), its d/dlogp), r = exp(lp - old)."""
    r = math.exp(lp - old)
    clipped = (A > 0 and r > 1 + EPS) or (A < 0 and r < 1 - EPS)
    return -min(r * A, min(max(r, 1 - EPS), 1 + EPS) * A), 0.0 if clipped else -A * r


def check(got_loss, got_grad, want_loss, want_grad, x, tol=1e-12):
    """got against per-token hand lists; masked tokens must be exactly 0 in both."""
    w, keep = weights(x).tolist(), x["mask"].tolist()
    for t in range(len(keep)):
        if not keep[t]:
            assert got_loss[t] == 0 and got_grad[t] == 0, t
        else:
            assert got_loss[t].item() == pytest.approx(want_loss[t], abs=tol), t
            assert got_grad[t].item() == pytest.approx(w[t] * want_grad[t], abs=tol), t


def bit_equal(a, b):
    (la, sa, ga), (lb, sb, gb) = a, b
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    for f in ("clipped_low", "clipped_high", "kl", "kl_capped"):
        assert torch.equal(getattr(sa, f), getattr(sb, f)), f


def today(x, **kw):
    """today_loss on inputs x, in value_and_grad's form."""
    args = dict(old_logp=x["old"], ref_logp=None, beta=0.0)
    args.update(kw)
    lt, st = today_loss(x["logp"], args["old_logp"], args["ref_logp"], x["adv"], x["mask"], EPS, EPS, args["beta"])
    g, = torch.autograd.grad((lt * weights(x)).sum(), x["logp"])
    return lt, st, g


def seqs(x):
    """{output: its kept token indices}."""
    out = collections.defaultdict(list)
    for t, (i, k) in enumerate(zip(x["rows"].tolist(), x["mask"].tolist())):
        if k:
            out[i].append(t)
    return out


# ------------------------------------------------------------------------------------------------------------------
# the default is today's loss


@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_keywords_are_todays_loss_bit_for_bit(on_policy, dtype):
    x = inputs(dtype)
    old = None if on_policy else x["old"]
    bit_equal(value_and_grad(x, old_logp=old, ref_logp=x["ref"], beta=0.04),
              today(x, old_logp=old, ref_logp=x["ref"], beta=0.04))


# ------------------------------------------------------------------------------------------------------------------
# GSPO: the sequence-level ratio


def test_sequence_ratio_by_hand():
    x = inputs()
    lt, st, g = value_and_grad(x, rows=x["rows"], ratio_level="sequence")
    lp, old, A = x["logp"].tolist(), x["old"].tolist(), x["adv"].tolist()
    want_loss, want_grad, clipped = [0.0] * len(lp), [0.0] * len(lp), []
    for i, toks in seqs(x).items():
        s = math.exp(sum(lp[t] - old[t] for t in toks) / len(toks))  # one ratio per output
        a = A[toks[0]]
        clipped.append((a > 0 and s > 1 + EPS) or (a < 0 and s < 1 - EPS))
        for t in toks:
            want_loss[t] = -min(s * a, min(max(s, 1 - EPS), 1 + EPS) * a)
            want_grad[t] = 0.0 if clipped[-1] else -a * s  # d (sg[s] exp(lp - sg[lp])) / d lp = s
    assert any(clipped) and not all(clipped)  # both cases are exercised
    check(lt, g, want_loss, want_grad, x)
    n_clipped = sum(len(toks) for (i, toks), c in zip(seqs(x).items(), clipped) if c)
    assert (st.clipped_low + st.clipped_high).sum().item() == n_clipped  # whole outputs clip


def test_sequence_ratio_with_seq_mean_token_mean_weights_is_gspo_exactly():
    """sum_t w_t loss_t with w = 1 / (|o_i| n) has the value and gradient of GSPO's per-sequence objective,
    -1/n sum_i min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean log-ratio), differentiated through s_i."""
    x = inputs()
    groups = seqs(x)
    w = torch.zeros(len(x["rows"]), dtype=torch.float64)
    for toks in groups.values():
        w[toks] = 1.0 / (len(toks) * len(groups))
    lt, _ = loss.grpo_loss(x["logp"], x["old"], None, x["adv"], x["mask"], EPS, EPS, 0.0, rows=x["rows"],
                           ratio_level="sequence")
    total = (lt * w).sum()
    g, = torch.autograd.grad(total, x["logp"])
    lp = x["logp"].detach().clone().requires_grad_()
    J = 0.0
    for toks in groups.values():
        s = torch.exp((lp[toks] - x["old"][toks]).mean())
        a = x["adv"][toks[0]]
        J = J - torch.minimum(s * a, s.clamp(1 - EPS, 1 + EPS) * a) / len(groups)
    want, = torch.autograd.grad(J, lp)
    assert total.item() == pytest.approx(J.item(), abs=1e-12)
    assert torch.allclose(g, torch.where(x["mask"], want, 0.0), atol=1e-12) and g.abs().max() > 0


@pytest.mark.parametrize("on_policy", [False, True])
def test_sequence_ratio_with_one_token_outputs_is_todays_loss(on_policy):
    x = inputs(torch.float32, lens=(1,) * 12, masked=(3,))
    old = None if on_policy else x["old"]
    got = value_and_grad(x, old_logp=old, ref_logp=x["ref"], beta=0.04, rows=x["rows"], ratio_level="sequence")
    bit_equal(got, today(x, old_logp=old, ref_logp=x["ref"], beta=0.04))
    assert on_policy or (got[1].clipped_low + got[1].clipped_high).sum() > 0


def test_sequence_ratio_does_not_depend_on_micro_batching():
    """Sequences never straddle micro-batches, so GSPO's per-sequence means see whole outputs whatever the split."""
    model = tiny(200)
    rows = make_rows(masked=(2,))
    with torch.no_grad():
        lp = logprobs(model, rows, 1.0).tolist()
    for r in rows:
        own, lp = lp[:len(r["completion"])], lp[len(r["completion"]):]
        r["old_logp"] = [v + 0.05 * ((j % 3) - 1) for j, v in enumerate(own)]
    for agg in ("seq_mean_token_mean", "token_mean"):
        g1, m1 = grads_of(model, rows, cfg(loss_agg=agg, ratio_level="sequence", micro_batch_size=len(rows)),
                          on_policy=False)
        g3, m3 = grads_of(model, rows, cfg(loss_agg=agg, ratio_level="sequence", micro_batch_size=3),
                          on_policy=False)
        assert torch.allclose(g1, g3, atol=1e-7, rtol=1e-5) and g1.abs().max() > 0
        gt, _ = grads_of(model, rows, cfg(loss_agg=agg, micro_batch_size=3), on_policy=False)
        assert not torch.allclose(g1, gt, atol=1e-7, rtol=1e-5)  # and it is not the token-level loss


# ------------------------------------------------------------------------------------------------------------------
# TIS and MIS: the sampler/trainer mismatch


def correction(x, train, **flags):
    c = cfg(**flags)
    return loss.sampler_correction(train, x["sampler"], x["mask"], x["rows"], c)


def test_tis_by_hand_and_its_weight_is_detached():
    x = inputs()
    w, dropped = correction(x, x["old"], tis_cap=1.2)
    lt, _, g = value_and_grad(x, is_weight=w)
    lp, old, sm, A = x["logp"].tolist(), x["old"].tolist(), x["sampler"].tolist(), x["adv"].tolist()
    want_loss, want_grad, capped = [0.0] * len(lp), [0.0] * len(lp), 0
    for t in sum(seqs(x).values(), []):
        rho = math.exp(old[t] - sm[t])  # pi_train (at the old parameters) / pi_sampler
        capped += rho > 1.2
        v, d = token_by_hand(lp[t], old[t], A[t])
        want_loss[t], want_grad[t] = min(rho, 1.2) * v, min(rho, 1.2) * d
    assert 0 < capped < int(x["mask"].sum()) and not dropped.any()
    check(lt, g, want_loss, want_grad, x)
    # on-policy the trainer's own log-probs are pi_train: passed with their graph, the weight still carries none
    w, _ = correction(x, x["logp"], tis_cap=1.2)
    assert not w.requires_grad
    lt, _, g = value_and_grad(x, old_logp=None, is_weight=w)
    rho = [math.exp(a - b) if k else 0.0 for a, b, k in zip(lp, sm, x["mask"].tolist())]
    check(lt, g, [-min(r, 1.2) * a for r, a in zip(rho, A)], [-min(r, 1.2) * a for r, a in zip(rho, A)], x)


def test_tis_with_sampler_equal_to_trainer_is_todays_loss():
    x = inputs(torch.float32)
    x["sampler"] = x["old"].clone()
    w, _ = correction(x, x["old"], tis_cap=2.0)
    bit_equal(value_and_grad(x, is_weight=w, ref_logp=x["ref"], beta=0.04), today(x, ref_logp=x["ref"], beta=0.04))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_mis_by_hand(level):
    x = inputs()
    lo, hi = (0.8, 1.25) if level == "token" else (0.7, 1.3)
    w, dropped = correction(x, x["old"], mis_low=lo, mis_high=hi, mis_level=level, tis_cap=1.1)
    lt, _, g = value_and_grad(x, is_weight=w)
    lp, old, sm, A = x["logp"].tolist(), x["old"].tolist(), x["sampler"].tolist(), x["adv"].tolist()
    want_loss, want_grad, want_dropped = [0.0] * len(lp), [0.0] * len(lp), []
    for toks in seqs(x).values():
        seq_rho = math.exp(sum(old[t] - sm[t] for t in toks))  # a sequence's ratio: the product over its tokens
        for t in toks:
            rho = math.exp(old[t] - sm[t])
            test = rho if level == "token" else seq_rho
            if not lo <= test <= hi:
                want_dropped.append(t)
                continue
            v, d = token_by_hand(lp[t], old[t], A[t])
            want_loss[t], want_grad[t] = min(rho, 1.1) * v, min(rho, 1.1) * d  # with TIS on the kept ones
    assert dropped.nonzero().flatten().tolist() == want_dropped
    assert 0 < len(want_dropped) < int(x["mask"].sum())
    check(lt, g, want_loss, want_grad, x)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_mis_with_a_band_around_every_ratio_is_todays_loss(level):
    x = inputs(torch.float32)
    keep = x["mask"]
    seq = loss.sequence_sum(torch.where(keep, x["old"] - x["sampler"], 0.0), x["rows"]).exp()
    rho = torch.cat([(x["old"] - x["sampler"])[keep].exp(), seq[keep]])
    lo, hi = 0.5 * float(rho.min()), 2.0 * float(rho.max())
    w, dropped = correction(x, x["old"], mis_low=lo, mis_high=hi, mis_level=level)
    assert not dropped.any()
    bit_equal(value_and_grad(x, is_weight=w), today(x))


def test_tis_and_mis_reach_train_step():
    """sampler = trainer - log 2 on every token: rho = 2, so TIS with cap 1.5 scales the whole gradient by 1.5, a
    band [0.5, 1.9] drops every token, and the gap metrics see |log 2|."""
    model = tiny(200)
    rows = make_rows(masked=(2,))
    with torch.no_grad():
        lp = logprobs(model, rows, 1.0).tolist()
    for r in rows:
        r["sampler_logp"], lp = [v - math.log(2) for v in lp[:len(r["completion"])]], lp[len(r["completion"]):]
    g0, m0 = grads_of(model, rows, cfg())
    g1, m1 = grads_of(model, rows, cfg(tis_cap=1.5))
    assert torch.allclose(g1, 1.5 * g0, atol=1e-8, rtol=1e-5) and g0.abs().max() > 0
    g2, m2 = grads_of(model, rows, cfg(mis_low=0.5, mis_high=1.9))
    assert g2.abs().max() == 0 and m2["mis_masked"] == m2["tokens"] > 0 and m0["mis_masked"] == 0
    g3, m3 = grads_of(model, rows, cfg(mis_low=0.5, mis_high=2.1))
    assert torch.equal(g3, g0) and m3["mis_masked"] == 0
    assert m0["gap_max"] == pytest.approx(math.log(2), abs=1e-5)
    assert m0["gap"] / m0["tokens"] == pytest.approx(math.log(2), abs=1e-5)


def test_gap_max_is_the_largest_token_gap_over_micro_batches():
    model = tiny(200)
    rows = make_rows(masked=(5,))
    g = torch.Generator().manual_seed(3)
    for i, r in enumerate(rows):
        r["sampler_logp"] = (-3 * torch.rand(len(r["completion"]), generator=g)).tolist()
    rows[5]["sampler_logp"][0] = -1e4  # a masked output: never counted
    _, m = grads_of(model, rows, cfg(micro_batch_size=3))
    with torch.no_grad():
        lp = logprobs(model, rows, 1.0)
    keep = torch.tensor([not r["masked"] for r in rows for _ in r["completion"]])
    sampler = torch.tensor([v for r in rows for v in r["sampler_logp"]])
    assert m["gap_max"] == pytest.approx((sampler - lp).abs()[keep].max().item(), rel=1e-6)
    assert m["gap_max"] > m["gap"] / m["tokens"]


# ------------------------------------------------------------------------------------------------------------------
# KL estimators


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators_by_hand(est):
    x = inputs()
    lt, st, g = value_and_grad(x, ref_logp=x["ref"], beta=0.3, kl_estimator=est)
    lp, old, ref, A = x["logp"].tolist(), x["old"].tolist(), x["ref"].tolist(), x["adv"].tolist()
    want_loss, want_grad, want_kl, capped = [0.0] * len(lp), [0.0] * len(lp), [0.0] * len(lp), []
    for t in sum(seqs(x).values(), []):
        d = ref[t] - lp[t]
        if est == "k1":
            kl, dkl = -d, 1.0
        elif est == "k2":
            kl, dkl = d * d / 2, -d
        else:
            kl, dkl = math.exp(d) - d - 1, 1 - math.exp(d)
            if kl > loss.K3_MAX:
                kl, dkl = loss.K3_MAX, 0.0
                capped.append(t)
        v, dv = token_by_hand(lp[t], old[t], A[t])
        want_loss[t], want_grad[t], want_kl[t] = v + 0.3 * kl, dv + 0.3 * dkl, kl
    check(lt, g, want_loss, want_grad, x)
    assert st.kl.tolist() == pytest.approx(want_kl, abs=1e-12)
    assert st.kl_capped.nonzero().flatten().tolist() == capped and (0 in capped) == (est == "k3")


def test_k3_estimator_is_todays_kl():
    x = inputs(torch.float32)
    got = value_and_grad(x, ref_logp=x["ref"], beta=0.04, kl_estimator="k3")
    bit_equal(got, today(x, ref_logp=x["ref"], beta=0.04))
    assert 0 < got[1].kl_capped.sum() < got[1].kl.count_nonzero()  # capped and uncapped tokens


@pytest.mark.parametrize("est", ["k1", "k2"])
def test_kl_estimator_reaches_train_step(est):
    model, ref, rows = tiny(200), tiny(200, seed=1), make_rows(masked=(2,))
    _, m = grads_of(model, rows, cfg(beta=0.1, kl_estimator=est), ref=ref)
    with torch.no_grad():
        d = (logprobs(ref, rows, 1.0) - logprobs(model, rows, 1.0)).double()
    keep = torch.tensor([not r["masked"] for r in rows for _ in r["completion"]])
    want = -d if est == "k1" else d * d / 2
    assert m["kl"] == pytest.approx(want[keep].sum().item(), rel=1e-5) and m["kl_capped"] == 0


# ------------------------------------------------------------------------------------------------------------------
# entropy bonus


def test_entropy_bonus_by_hand_and_zero_is_todays_loss():
    x = inputs()
    ent = (2 * torch.rand(len(x["rows"]), generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    ent = ent.requires_grad_()
    lt, st = loss.grpo_loss(x["logp"], x["old"], None, x["adv"], x["mask"], EPS, EPS, 0.0, entropy=ent,
                            entropy_coef=0.05)
    g_lp, g_ent = torch.autograd.grad((lt * weights(x)).sum(), (x["logp"], ent))
    lp, old, A, H = x["logp"].tolist(), x["old"].tolist(), x["adv"].tolist(), ent.tolist()
    want_loss, want_grad = [0.0] * len(lp), [0.0] * len(lp)
    for t in sum(seqs(x).values(), []):
        v, d = token_by_hand(lp[t], old[t], A[t])
        want_loss[t], want_grad[t] = v - 0.05 * H[t], d
    check(lt, g_lp, want_loss, want_grad, x)
    w = weights(x)
    assert torch.allclose(g_ent, torch.where(x["mask"], -0.05 * w, 0.0), atol=1e-15)
    # coefficient 0: today's loss exactly, even with garbage entropies
    x = inputs(torch.float32)
    bad = torch.full((len(x["rows"]),), float("nan"), requires_grad=True)
    bit_equal(value_and_grad(x, entropy=bad, entropy_coef=0.0), today(x))


def test_entropy_gradient_through_token_logprobs_matches_float64_autograd():
    """The torch path of kernels.token_logprobs returns an entropy that carries its gradient: the bonus's
    d/dhidden and d/dW equal float64 autograd through a plain log-softmax written here."""
    g = torch.Generator().manual_seed(0)
    N, D, V, T = 29, 16, 37, 0.7
    h = torch.randn(N, D, generator=g).requires_grad_()
    W = (0.5 * torch.randn(V, D, generator=g)).requires_grad_()
    tgt = torch.randint(0, V, (N,), generator=g)
    adv, mask = torch.randn(N, generator=g), torch.rand(N, generator=g) > 0.2
    w = torch.rand(N, generator=g)
    logp, ent = kernels.token_logprobs(h, W, tgt, T, backend="torch", return_entropy=True, chunk=8)
    lt, _ = loss.grpo_loss(logp, None, None, adv, mask, 0.2, 0.2, 0.0, entropy=ent, entropy_coef=0.3)
    gh, gW = torch.autograd.grad((lt * w).sum(), (h, W))
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    lq = torch.log_softmax(h64 @ W64.T / T, -1)
    lp64, H64 = lq[torch.arange(N), tgt], -(lq.exp() * lq).sum(-1)
    J = (w.double() * mask * (-adv.double() * torch.exp(lp64 - lp64.detach()) - 0.3 * H64)).sum()
    wh, wW = torch.autograd.grad(J, (h64, W64), retain_graph=True)
    assert (gh.double() - wh).abs().max() < 1e-5 and (gW.double() - wW).abs().max() < 1e-5
    # the entropy part is really there: without it the gradient differs by far more than the tolerance
    J0 = (w.double() * mask * (-adv.double() * torch.exp(lp64 - lp64.detach()))).sum()
    assert (torch.autograd.grad(J0, h64)[0] - wh).abs().max() > 1e-2


def test_entropy_bonus_reaches_train_step():
    """The step's gradient gains exactly the gradient of -coef * sum(w * entropy) of the same forward (advantages 0,
    so no large policy-gradient term leaves its fp32 rounding in the difference)."""
    model = tiny(200)
    rows = [dict(r, adv=0.0) for r in make_rows(masked=(2,))]
    g0, _ = grads_of(model, rows, cfg(micro_batch_size=3))
    g1, _ = grads_of(model, rows, cfg(micro_batch_size=3, entropy_coef=0.02))
    model.zero_grad(set_to_none=True)
    b = batch(rows)
    _, ent = logprobs(model, rows, 1.0, entropy=True)
    w = loss.token_weights(b, cfg())[rollout.pack(b)[2]].float()
    (-0.02 * (w * ent).sum()).backward()
    want = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    assert want.abs().max() > 1e-6 and torch.allclose(g1 - g0, want, atol=1e-10, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# KL in the reward


def rollout_round(monkeypatch, c, model, n_prompts=3):
    """score_round on a faked sampler and scorer (non-dyadic rewards, an overlong penalty, a truncated output, a
    group whose accuracy cannot be judged) -> (its Batch, the advantages it gave)."""
    tk = toy.toy_tokenizer(n_docs=200)
    G, lens = c.group_size, [2, 5, 6, 3]
    monkeypatch.setattr(grpo.rollout, "generate", lambda policy, prompts, *a, num_samples, **kw: rollout.Rollout(
        tokens=[[5 + (i % 7)] * lens[i % G] for i in range(len(prompts) * num_samples)],
        logprobs=[[-1.0] * lens[i % G] for i in range(len(prompts) * num_samples)],
        truncated=[i % G == 2 for i in range(len(prompts) * num_samples)], num_samples=num_samples))

    def scores(completions, examples, weights=None, **kw):
        n = len(completions)
        acc = [None if i < G else (0.1 * i) % 1 for i in range(n)]  # the first group: unjudged
        total = [0.35 * (i % 3) + (a or 0) for i, a in enumerate(acc)]
        return total, {"accuracy": acc, "format": [0.0] * n, "language": [None] * n}, {}
    monkeypatch.setattr(grpo.rewards, "score_batch", scores)
    stats = {"sample_s": 0.0, "new_tokens": 0, "zero_std_groups": 0, "sampled_groups": 0,
             "reasons": collections.Counter()}
    exs = [data.Example(prompt=f"{i}+2", answer="3") for i in range(n_prompts)]
    got, _ = grpo.score_round(model, tk, exs, c, 0, 0, "", [tk.eot_id], stats)
    b = rollout.make_batch(**got)
    return b, b.adv.clone(), tk.vocab_size


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_kl_in_reward_with_beta_zero_is_a_no_op(monkeypatch, scale):
    c = cfg(group_size=4, template="none", max_new_tokens=6, overlong_buffer=3, mask_truncated=True,
            adv_scale=scale, beta=0.0, kl_in_reward=True)
    model = tiny(278)
    b, adv, vocab = rollout_round(monkeypatch, c, model)
    assert adv[:4].abs().max() == 0 and adv[4:].abs().max() > 0
    grpo.kl_reward(model, tiny(278, seed=1), b, c, vocab)
    assert torch.equal(b.adv, adv)


@pytest.mark.parametrize("est", ["k1", "k3"])
def test_kl_in_reward_by_hand(monkeypatch, est):
    c = cfg(group_size=4, template="none", max_new_tokens=6, overlong_buffer=3, beta=0.2, kl_in_reward=True,
            kl_estimator=est)
    model, ref = tiny(278), tiny(278, seed=1)
    b, adv0, vocab = rollout_round(monkeypatch, c, model)
    mean_kl = grpo.kl_reward(model, ref, b, c, vocab)
    with torch.no_grad():
        packed = rollout.pack(b)
        d = (grpo.token_logprobs(ref, b, packed, vocab, 1.0) - grpo.token_logprobs(model, b, packed, vocab, 1.0))
    d, rows = d.double().tolist(), packed[2].tolist()
    per_out = [0.0] * len(b.adv)
    for di, r in zip(d, rows):
        per_out[r] += -di if est == "k1" else min(math.exp(di) - di - 1, loss.K3_MAX)
    pen = [loss.overlong_penalty(L, 6, 3) for L in b.comp_len.tolist()]
    shaped = torch.tensor([s[0] + p - 0.2 * k for s, p, k in zip(b.scores.tolist(), pen, per_out)])
    want = group_advantages(shaped.view(-1, 4))
    want[0] = 0.0  # the unjudged group stays out
    assert torch.allclose(b.adv, want.view(-1), atol=1e-5) and not torch.allclose(b.adv, adv0, atol=1e-3)
    assert mean_kl == pytest.approx(sum(per_out) / len(d), rel=1e-5)


def test_kl_in_reward_leaves_the_loss_without_kl():
    """With --kl-in-reward train_step runs no reference forward: the step equals the beta = 0 step."""
    model, ref, rows = tiny(200), tiny(200, seed=1), make_rows()
    g0, m0 = grads_of(model, rows, cfg(beta=0.0))
    g1, m1 = grads_of(model, rows, cfg(beta=0.1, kl_in_reward=True), ref=ref)
    g2, m2 = grads_of(model, rows, cfg(beta=0.1), ref=ref)
    assert torch.equal(g0, g1) and m1["kl"] == 0 and m2["kl"] > 0 and not torch.equal(g0, g2)


def test_kl_in_reward_on_two_ranks_equals_one_process(tmp_path):
    """Each rank holds one group; with --adv-scale=batch the std spans both ranks' rewards (all-reduced) and the
    reference forward runs FSDP-sharded: the advantages equal one process's over the whole rollout."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import dist_worker
    torchrun("tests/dist_worker.py", "klreward", str(tmp_path))
    got = [torch.load(tmp_path / f"kl{r}.pt") for r in range(2)]
    want = dist_worker.kl_reward_step(sharded=False)
    assert torch.allclose(torch.cat([got[0]["adv"], got[1]["adv"]]), want["adv"], atol=1e-5)
    assert got[0]["kl"] == pytest.approx(want["kl"], rel=1e-5) and got[1]["kl"] == got[0]["kl"]
    assert want["adv"].abs().max() > 0 and want["kl"] != 0


# ------------------------------------------------------------------------------------------------------------------
# the flags: checked at start, wired through a short run, logged


@pytest.mark.parametrize("argv, needle", [
    (["--tis-cap=0.5"], "--tis-cap: must be 0"),
    (["--mis-high=0.9"], "--mis-high: the band needs"),
    (["--mis-low=1.2", "--mis-high=2"], "--mis-high: the band needs"),
    (["--mis-low=0.5"], "--mis-low: needs --mis-high"),
    (["--tis-cap=2", "--old-logp=sampler"], "--old-logp: --old-logp=sampler"),
    (["--kl-in-reward", "--beta=0"], "--kl-in-reward: needs --beta > 0"),
    (["--entropy-coef=-0.1"], "--entropy-coef: must be >= 0"),
    (["--ratio-level=seq"], "--ratio-level='seq': must be one of token, sequence"),
    (["--kl-estimator=k4"], "--kl-estimator='k4': must be one of k1, k2, k3"),
])
def test_invalid_variant_settings_fail_at_start(argv, needle, base_dir):  # noqa: F811
    with pytest.raises(config.ConfigError, match=needle):
        grpo.main(["--preset=cpu", f"--init-from={base_dir}", *argv])


RUNS = {
    "default": ([], dict(ratio_level="token", is_weight=False, kl_estimator="k3", entropy_coef=0.0)),
    "gspo": (["--ratio-level=sequence"], dict(ratio_level="sequence")),
    "tis": (["--tis-cap=2"], dict(is_weight=True)),
    "mis": (["--mis-low=0.5", "--mis-high=2", "--tis-cap=3"], dict(is_weight=True)),
    "mis_seq": (["--mis-low=0.5", "--mis-high=2", "--mis-level=sequence"], dict(is_weight=True)),
    "k2": (["--kl-estimator=k2", "--beta=0.05"], dict(kl_estimator="k2", ref=True)),
    "kl_in_reward": (["--kl-in-reward", "--beta=0.05"], dict(ref=False)),
    "entropy": (["--entropy-coef=0.01"], dict(entropy_coef=0.01)),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_each_flag_runs_and_logs(name, base_dir, tmp_path, monkeypatch):  # noqa: F811
    """Two updates per rollout (the second off-policy) for two rollouts, with rewards that vary and a sampler whose
    log-probs on every odd output are 1 below the trainer's (rho = e on each of their tokens): the variant reaches
    loss.grpo_loss, the step is finite, the mismatch metrics are logged every step, and MIS drops the odd outputs."""
    argv, want = RUNS[name]
    seen = []
    orig, generate = loss.grpo_loss, rollout.generate
    monkeypatch.setattr(loss, "grpo_loss", lambda *a, **kw: seen.append((a, kw)) or orig(*a, **kw))

    def shifted(*a, **kw):
        out = generate(*a, **kw)
        out.logprobs = [[v - 1.0 for v in lp] if i % 2 else lp for i, lp in enumerate(out.logprobs)]
        return out

    def digits(completions, examples, weights=None, **kw):
        r = [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in completions]
        return r, {"accuracy": r, "format": [0.0] * len(r), "language": [None] * len(r)}, {}
    monkeypatch.setattr(grpo.rollout, "generate", shifted)
    monkeypatch.setattr(grpo.rewards, "score_batch", digits)
    run(base_dir, tmp_path / name, "--max-steps=4", "--num-minibatches=2", "--lr=1e-2", *argv)
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    assert len(rows) == 4 and seen
    for a, kw in seen:
        for k, v in want.items():
            got = {"is_weight": kw["is_weight"] is not None, "ref": a[2] is not None}.get(k, kw.get(k))
            assert got == v, (k, got)
    for i, r in enumerate(rows):
        assert r["skipped_steps"] == 0 and math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert 0.2 < r["sampler_trainer_gap"] < r["sampler_trainer_gap_max"]
        if i % 2 == 0:  # a rollout's first update: the trainer is still at the sampler's parameters
            assert r["sampler_trainer_gap_max"] == pytest.approx(1.0, abs=1e-4)  # the odd outputs' shift
        assert ("mis_masked" in r) == name.startswith("mis")
        if name.startswith("mis"):  # the odd outputs' tokens, about half
            assert 0.2 < r["mis_masked"] < 0.8
    if name in ("k2", "kl_in_reward"):
        assert rows[-1]["kl"] > 0 and rows[0]["kl"] >= 0


def test_the_fused_kernel_runs_only_the_default_loss(monkeypatch):
    """On a GPU grpo_loss_auto may use the fused kernel, which implements only the default loss: with any variant
    on it must run the definition."""
    x = inputs(torch.float32)
    calls = []

    def fused(logp, old, ref, adv, mask, lo, hi, beta, backend, return_stats):
        calls.append(1)
        return loss.grpo_loss(logp, old, ref, adv, mask, lo, hi, beta)
    monkeypatch.setattr(kernels, "use_triton", lambda *a, **k: True)  # as on a GPU
    monkeypatch.setattr(kernels, "grpo_token_loss", fused)
    monkeypatch.setattr(loss, "_fused_ok", {})
    args = (x["logp"], x["old"], x["ref"], x["adv"], x["mask"], EPS, EPS, 0.04)
    loss.grpo_loss_auto(*args, rows=x["rows"])
    assert len(calls) == 2  # the first-use check, then the micro-batch
    w, _ = correction(x, x["old"], tis_cap=2.0)
    for kw in (dict(ratio_level="sequence"), dict(is_weight=w), dict(kl_estimator="k1"),
               dict(entropy=torch.ones_like(x["adv"]), entropy_coef=0.1)):
        calls.clear()
        got, _ = loss.grpo_loss_auto(*args, rows=x["rows"], **kw)
        assert not calls, kw
        assert torch.equal(got, loss.grpo_loss(*args, rows=x["rows"], **kw)[0])
