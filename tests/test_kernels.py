import pytest
import torch

import kernels
from kernels import grpo_token_loss_reference, token_logprobs_reference


def data(N=37, D=24, V=203, dtype=torch.float32, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    t[-1] = V - 1  # a target in the last (partial) vocabulary tile
    if shift:  # all-negative logits: a large negative bias through an extra constant feature
        h.data[:, 0] = 1.0
        w.data[:, 0] = -shift
    return h, w, t


def grads(f, h, w, t, T, seed=1):
    lp, ent = f(h, w, t, T)
    g = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(lp.shape, generator=g, dtype=torch.float64), torch.randn(lp.shape, generator=g,
                                                                                    dtype=torch.float64)
    gh, gw = torch.autograd.grad((lp.double() * g1).sum() + (ent.double() * g2).sum(), (h, w))
    return lp.double(), ent.double(), gh.double(), gw.double()


def ours(chunk):
    return lambda h, w, t, T: kernels.token_logprobs(h, w, t, T, backend="torch", return_entropy=True, chunk=chunk)


@pytest.mark.parametrize("T", [1.0, 0.6])
@pytest.mark.parametrize("shift", [0.0, 40.0])
def test_token_logprobs_torch_matches_float64_reference(T, shift):
    h, w, t = data(shift=shift)
    ref = grads(token_logprobs_reference, h, w, t, T)
    got = grads(ours(chunk=8), h, w, t, T)  # 37 rows: 5 chunks, the last one partial
    # fp32 accumulation: with a -40 shift, d/dh of the shift feature sums +-40-sized terms to ~0 (1e-3 abs)
    for a, b, tol in zip(got, ref, [x * (1 + shift / 8) for x in (2e-5, 5e-5, 2e-4, 2e-4)]):
        assert (a - b).abs().max() < tol
    if shift:
        z = h.detach() @ w.detach().T
        assert (z < 0).all()  # the case verl #2656 got wrong


def test_token_logprobs_exact_in_float64():
    h, w, t = data(dtype=torch.float64)
    for a, b in zip(grads(ours(chunk=5), h, w, t, 0.7), grads(token_logprobs_reference, h, w, t, 0.7)):
        assert (a - b).abs().max() < 1e-10


def test_token_logprobs_bf16_inputs_accumulate_in_fp32():
    h, w, t = data(dtype=torch.bfloat16)
    lp, ent = kernels.token_logprobs(h, w, t, return_entropy=True, chunk=16)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    ref_lp, ref_ent = token_logprobs_reference(h, w, t)  # float64 math on the same bf16 values
    assert (lp.double() - ref_lp).abs().max() < 1e-4  # (h @ W).float() in bf16 would be off by ~1e-2 (M8)
    gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    rh, rw = torch.autograd.grad(ref_lp.sum(), (h, w))
    assert gh.dtype == torch.bfloat16 and (gh.double() - rh).abs().max() < 0.05 * rh.abs().max()


def test_chunk_size_does_not_change_results():
    h, w, t = data(N=50)
    a = grads(ours(chunk=7), h, w, t, 1.0)
    b = grads(ours(chunk=4096), h, w, t, 1.0)
    for x, y in zip(a, b):
        assert (x - y).abs().max() < 1e-5


def test_token_logprobs_shape_errors():
    h, w, t = data()
    with pytest.raises(ValueError, match="want hidden"):
        kernels.token_logprobs(h, w[:, :5], t)
    with pytest.raises(ValueError, match="backend"):
        kernels.token_logprobs(h, w, t, backend="cuda-magic")


def loss_inputs(N=41, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(N, generator=g) * 3).to(dtype).requires_grad_(True)
    old = logp.detach() + torch.randn(N, generator=g).to(dtype) * 0.5  # ratios well outside [0.8, 1.2] too
    ref = logp.detach() + torch.randn(N, generator=g).to(dtype) * 0.3
    adv = torch.randn(N, generator=g).to(dtype)
    mask = (torch.rand(N, generator=g) > 0.2).to(dtype)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("variant", ["full", "old_none", "ref_none", "beta0"])
def test_grpo_token_loss_matches_reference(variant):
    logp, old, ref, adv, mask = loss_inputs()
    old = None if variant == "old_none" else old
    ref = None if variant == "ref_none" else ref
    beta = 0.0 if variant == "beta0" else 0.05
    a = kernels.grpo_token_loss(logp, old, ref, adv, mask, 0.2, 0.28, beta, backend="torch")
    b = grpo_token_loss_reference(logp, old, ref, adv, mask, 0.2, 0.28, beta)
    assert (a.double() - b).abs().max() < 1e-6
    ga, = torch.autograd.grad(a.sum(), logp)
    gb, = torch.autograd.grad(b.sum(), logp)
    assert (ga.double() - gb).abs().max() < 1e-6
    assert (a[mask == 0] == 0).all() and (ga[mask == 0] == 0).all()


def test_grpo_loss_clipping_zeroes_exactly_the_clipped_tokens():
    logp = torch.zeros(6, requires_grad=True)
    old = torch.log(torch.tensor([1 / 1.5, 1 / 1.5, 1 / 0.5, 1 / 0.5, 1.0, 1.0]))  # ratios 1.5,1.5,0.5,0.5,1,1
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    loss = kernels.grpo_token_loss(logp, old, None, adv, torch.ones(6), 0.2, 0.2, 0.0)
    g, = torch.autograd.grad(loss.sum(), logp)
    # A>0 & r>1+eps: clipped (0); A<0 & r>1+eps: not clipped; A>0 & r<1-eps: not clipped; A<0 & r<1-eps: clipped
    assert g[0] == 0 and g[3] == 0
    assert g[1] == pytest.approx(1.5) and g[2] == pytest.approx(-0.5) and g[4] == -1 and g[5] == 1
    # asymmetric epsilons: raising eps_high un-clips token 0
    loss = kernels.grpo_token_loss(logp, old, None, adv, torch.ones(6), 0.2, 0.6, 0.0)
    g, = torch.autograd.grad(loss.sum(), logp)
    assert g[0] == pytest.approx(-1.5) and g[3] == 0


def test_k3_is_nonnegative_zero_at_ref_and_estimates_kl():
    logp = torch.linspace(-3, 0, 11)
    loss = kernels.grpo_token_loss(logp, None, logp.clone(), torch.zeros(11), torch.ones(11), 0.2, 0.2, 1.0)
    assert (loss == 0).all()
    # Monte Carlo: E_{x~pi}[k3(x)] == KL(pi || ref) for a small categorical
    g = torch.Generator().manual_seed(0)
    pi = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.2, 0.2, 0.6])
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    k3 = kernels.grpo_token_loss(pi.log()[x], None, ref.log()[x], torch.zeros(len(x)), torch.ones(len(x)),
                                 0.2, 0.2, 1.0)
    kl = (pi * (pi / ref).log()).sum()
    assert (k3 >= 0).all() and k3.mean() == pytest.approx(kl.item(), rel=0.02)
