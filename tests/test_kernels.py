"""kernels/: both backends against float64 references. Triton runs under TRITON_INTERPRET=1 (tests/conftest.py) at
tiny ragged sizes: interpreter blocks are 16 (rows, vocab, D) for the log-prob kernels and 64 for the loss, so
N=37, D=24, V=45 spans 3 row blocks, 2 D steps and 3 vocabulary tiles (the last partial) and, with chunk=16,
3 backward chunks (the last partial).
On a GPU, `TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py` runs every test on CUDA tensors with the
compiled kernels (GPU block sizes: fewer blocks at these sizes), the check to run before trusting them there."""
import math
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import _backend, grpo_token_loss_reference, token_logprobs_reference
from loss import grpo_loss

DEV = "cuda" if torch.cuda.is_available() and not _backend.INTERPRET else "cpu"
HAVE_TRITON = _backend.triton is not None and (_backend.INTERPRET or DEV == "cuda")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton with TRITON_INTERPRET=1, or a GPU")


@pytest.fixture(autouse=True)
def on_device():
    """Tensors the tests create land on DEV; seeded draws are made on the CPU (same numbers everywhere) and moved."""
    with torch.device(DEV):
        yield
# (backend, keyword options): torch with 5 chunks; triton with 1 or 2 vocabulary splits per row block
CONFIGS = [("torch", dict(chunk=8)),
           pytest.param("triton", dict(chunk=16, vocab_splits=1), marks=needs_triton, id="triton-1split"),
           pytest.param("triton", dict(chunk=16, vocab_splits=2), marks=needs_triton, id="triton-2splits")]


def data(N=37, D=24, V=45, dtype=torch.float32, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        h = torch.randn(N, D, generator=g)
        w = torch.randn(V, D, generator=g) * 0.5
        t = torch.randint(0, V, (N,), generator=g)
    h, w, t = h.to(DEV), w.to(DEV), t.to(DEV)
    t[-1] = V - 1  # a target in the last (partial) vocabulary tile
    if shift:  # all-negative logits: a large negative bias through a constant feature
        h[:, 0] = 1.0
        w[:, 0] = -shift
    return h.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True), t


def grads(f, h, w, t, T, seed=1):
    """(logp, entropy, d/dh, d/dw) of a random combination of both outputs, all float64."""
    lp, ent = f(h, w, t, T)
    g = torch.Generator().manual_seed(seed)
    g1, g2 = (torch.randn(lp.shape, generator=g, dtype=torch.float64, device="cpu").to(DEV) for _ in range(2))
    gh, gw = torch.autograd.grad((lp.double() * g1).sum() + (ent.double() * g2).sum(), (h, w))
    return lp.double(), ent.double(), gh.double(), gw.double()


def ours(backend, **kw):
    return lambda h, w, t, T: kernels.token_logprobs(h, w, t, T, backend=backend, return_entropy=True, **kw)


@pytest.mark.parametrize("backend,kw", CONFIGS)
@pytest.mark.parametrize("T,shift", [(1.0, 0.0), (0.6, 0.0), (1.0, 40.0)])
def test_token_logprobs_matches_float64_reference(backend, kw, T, shift):
    h, w, t = data(shift=shift)
    if shift:
        assert (h.detach() @ w.detach().T < -10).all()  # all-negative logits (verl #2656)
    ref = grads(token_logprobs_reference, h, w, t, T)
    got = grads(ours(backend, **kw), h, w, t, T)
    # fp32 accumulation; with the -40 shift, d/dh of the shift feature sums +-40-sized terms to ~0
    for name, a, b, tol in zip(("logp", "entropy", "dh", "dw"), got, ref, (2e-5, 2e-5, 5e-5, 5e-5)):
        assert (a - b).abs().max() < tol * (1 + shift / 4), name


def test_token_logprobs_torch_is_exact_in_float64():
    h, w, t = data(dtype=torch.float64)
    for a, b in zip(grads(ours("torch", chunk=5), h, w, t, 0.7), grads(token_logprobs_reference, h, w, t, 0.7)):
        assert a.dtype == torch.float64 and (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("backend,kw", CONFIGS[:2])
def test_token_logprobs_bf16_inputs_accumulate_in_fp32(backend, kw):
    h, w, t = data(dtype=torch.bfloat16)
    lp, ent, gh, gw = grads(ours(backend, **kw), h, w, t, 1.0)
    ref = grads(token_logprobs_reference, h, w, t, 1.0)  # float64 math on the same bf16 values
    # (h @ W).float() in bf16 would be off by ~1e-2 (PITFALLS M8); fp32 accumulation is off by ~1e-6
    assert (lp - ref[0]).abs().max() < 1e-4 and (ent - ref[1]).abs().max() < 1e-4
    for a, b in ((gh, ref[2]), (gw, ref[3])):  # gradients come back in bf16: relative tolerance
        assert (a - b).abs().max() < 0.02 * b.abs().max()
    out = kernels.token_logprobs(h, w, t, backend=backend, **kw)
    assert out.dtype == torch.float32
    gh, = torch.autograd.grad(out.sum(), h)
    assert gh.dtype == torch.bfloat16


@pytest.mark.parametrize("backend,kw", CONFIGS[:2])
def test_chunking_does_not_change_results(backend, kw):
    h, w, t = data(N=50)
    a = grads(ours(backend, **kw), h, w, t, 1.0)
    b = grads(ours(backend, chunk=4096, vocab_splits=3), h, w, t, 1.0)
    for x, y in zip(a, b):
        assert (x - y).abs().max() < 1e-5


@pytest.mark.parametrize("backend,kw", CONFIGS[:2])
def test_vocab_limit_matches_a_sampler_that_masks_padded_rows(backend, kw):
    """The sampler never samples padded LM-head rows: it gives them -inf logits before its softmax. The trainer's
    log-probs must use that same support, so vocab_limit drops them from the log-sum-exp too."""
    h, w, t = data(V=50)
    T, limit = 0.6, 45
    t = t % limit
    logits = h.detach() @ w.detach().T  # what the sampler sees: (N, 50) with 5 padded rows
    logits[:, limit:] = float("-inf")
    sampler = torch.log_softmax(logits / T, -1).gather(1, t[:, None]).squeeze(1)
    lp = kernels.token_logprobs(h, w, t, T, backend=backend, vocab_limit=limit, **kw)
    assert (lp - sampler).abs().max() < 1e-5
    full = kernels.token_logprobs(h, w, t, T, backend=backend, **kw)
    gap = sampler - full  # normalising over the padded rows too: off by log(1 + their share of the mass) > 0
    assert (gap > 0).all() and gap.max() > 1e-2
    gw, = torch.autograd.grad(lp.sum(), w)
    assert (gw[limit:] == 0).all() and (gw[:limit] != 0).any()
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 45\)"):
        kernels.token_logprobs(h, w, t.clone().fill_(47), T, backend=backend, vocab_limit=limit, **kw)


@pytest.mark.parametrize("backend,kw", CONFIGS[:2])
def test_single_output_gradients_and_caller_tensors_untouched(backend, kw):
    h, w, t = data()
    snap = [x.detach().clone() for x in (h, w, t)]
    versions = [x._version for x in (h, w, t)]
    lp, ent = kernels.token_logprobs(h, w, t, backend=backend, return_entropy=True, **kw)
    ref_lp, ref_ent = token_logprobs_reference(h, w, t)
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(2), device="cpu").to(DEV)
    for out, ref in ((lp, ref_lp), (ent, ref_ent)):  # backward through one output only (the other's grad is None)
        gh, gw = torch.autograd.grad((out * g).sum(), (h, w), retain_graph=True)
        rh, rw = torch.autograd.grad((ref * g).sum(), (h, w), retain_graph=True)
        assert (gh.double() - rh).abs().max() < 5e-5 and (gw.double() - rw).abs().max() < 5e-5
    assert (kernels.token_logprobs(h, w, t, backend=backend, **kw) == lp).all()  # entropy off: same logp
    assert all((x.detach() == s).all() for x, s in zip((h, w, t), snap))
    assert [x._version for x in (h, w, t)] == versions  # no in-place writes into the caller's tensors


def test_leading_dims_and_empty_input():
    h, w, t = data(N=12)
    lp = kernels.token_logprobs(h.view(3, 4, -1), w, t.view(3, 4))
    assert lp.shape == (3, 4) and (lp.reshape(-1) == kernels.token_logprobs(h, w, t)).all()
    empty = kernels.token_logprobs(h[:0], w, t[:0], return_entropy=True)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_token_logprobs_errors(monkeypatch):
    h, w, t = data()
    with pytest.raises(ValueError, match="same D"):
        kernels.token_logprobs(h, w[:, :5], t)
    with pytest.raises(ValueError, match="targets"):
        kernels.token_logprobs(h, w, t[:-1])
    with pytest.raises(ValueError, match="backend"):
        kernels.token_logprobs(h, w, t, backend="cuda-magic")
    with pytest.raises(ValueError, match="temperature"):
        kernels.token_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_limit"):
        kernels.token_logprobs(h, w, t, vocab_limit=46)
    with pytest.raises(ValueError, match="target ids"):
        kernels.token_logprobs(h, w, torch.cat([t[1:], torch.tensor([-1])]))
    with pytest.raises(ValueError, match="float64"):
        kernels.token_logprobs(h.double(), w.double(), t, backend="triton")
    h, w, t = h.cpu(), w.cpu(), t.cpu()
    assert _backend.use_triton("auto", h) is False  # CPU tensors: torch path
    monkeypatch.setattr(_backend, "INTERPRET", False)
    if _backend.triton is not None:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.token_logprobs(h, w, t, backend="triton")


def test_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import torch, kernels\n"
            "h, w, t = torch.randn(5, 4), torch.randn(7, 4), torch.tensor([0, 1, 2, 3, 6])\n"
            "assert kernels.token_logprobs(h, w, t).shape == (5,)\n"
            "try:\n    kernels.token_logprobs(h, w, t, backend='triton')\n"
            "except RuntimeError as e:\n    assert 'needs the triton package' in str(e); print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------------------------------------------
# GRPO token loss

LOSS_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def grpo_token_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, backend, return_stats=False):
    """The loss under test: loss.grpo_loss (torch: the definition the trainer runs on CPU) or the fused kernel."""
    if backend == "torch":
        out = grpo_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta)
    else:
        out = kernels.grpo_token_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, backend=backend,
                                      return_stats=True)
    return out if return_stats else out[0]


def loss_inputs(N=150, seed=0, dtype=torch.float32):
    """150 tokens (3 interpreter blocks, the last partial); ratios well outside [0.8, 1.28] on both sides; masked
    tokens carry NaN/inf garbage that must not leak."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        logp = (-torch.rand(N, generator=g) * 3).to(dtype)
        old = logp + torch.randn(N, generator=g).to(dtype) * 0.5
        ref = logp + torch.randn(N, generator=g).to(dtype) * 0.3
        adv = torch.randn(N, generator=g).to(dtype)
        mask = torch.rand(N, generator=g) > 0.2
    logp[~mask], old[~mask], ref[~mask], adv[~mask] = 1e4, float("nan"), float("inf"), float("-inf")
    logp, old, ref, adv, mask = (x.to(DEV) for x in (logp, old, ref, adv, mask))
    return logp.requires_grad_(True), old, ref, adv, mask


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("variant", ["full", "old_none", "ref_none", "beta0"])
def test_grpo_token_loss_matches_reference(backend, variant):
    logp, old, ref, adv, mask = loss_inputs()
    old = None if variant == "old_none" else old
    ref = None if variant == "ref_none" else ref
    beta = 0.0 if variant == "beta0" else 0.05
    a, st = grpo_token_loss(logp, old, ref, adv, mask, 0.2, 0.28, beta, backend=backend, return_stats=True)
    b, lo, hi, kl, cap = grpo_token_loss_reference(logp, old, ref, adv, mask, 0.2, 0.28, beta)
    assert a.dtype == torch.float32 and (a.double() - b).abs().max() < 1e-6
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(3), device="cpu").to(DEV)
    ga, = torch.autograd.grad((a * g).sum(), logp)
    gb, = torch.autograd.grad((b * g.double()).sum(), logp)
    assert (ga.double() - gb).abs().max() < 1e-6
    assert (a[~mask] == 0).all() and (ga[~mask] == 0).all() and torch.isfinite(ga).all()
    assert (st.clipped_low.double() == lo).all() and (st.clipped_high.double() == hi).all()
    assert (st.kl.double() - kl).abs().max() < 1e-6 and (st.kl_capped.double() == cap).all()
    if variant != "old_none":  # both clip sides occur in the data
        assert lo.sum() > 0 and hi.sum() > 0
    if variant == "ref_none":
        assert (st.kl == 0).all()
    if variant == "beta0":  # KL logged but not in the loss
        assert st.kl.abs().sum() > 0


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_grpo_loss_clipping_zeroes_exactly_the_clipped_tokens(backend):
    logp = torch.zeros(6, requires_grad=True)
    old = torch.log(torch.tensor([1 / 1.5, 1 / 1.5, 1 / 0.5, 1 / 0.5, 1.0, 1.0]))  # ratios 1.5,1.5,0.5,0.5,1,1
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    loss, st = grpo_token_loss(logp, old, None, adv, torch.ones(6), 0.2, 0.2, 0.0, backend=backend,
                                       return_stats=True)
    g, = torch.autograd.grad(loss.sum(), logp)
    # A>0 & r>1+eps: clipped (0); A<0 & r>1+eps: not clipped; A>0 & r<1-eps: not clipped; A<0 & r<1-eps: clipped
    assert g[0] == 0 and g[3] == 0
    assert g[1] == pytest.approx(1.5) and g[2] == pytest.approx(-0.5) and g[4] == -1 and g[5] == 1
    assert st.clipped_high.tolist() == [1, 0, 0, 0, 0, 0] and st.clipped_low.tolist() == [0, 0, 0, 1, 0, 0]
    assert loss.detach().tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8, -1, 1])
    # asymmetric epsilons: raising eps_high un-clips token 0
    loss = grpo_token_loss(logp, old, None, adv, torch.ones(6), 0.2, 0.6, 0.0, backend=backend)
    g, = torch.autograd.grad(loss.sum(), logp)
    assert g[0] == pytest.approx(-1.5) and g[3] == 0


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_on_policy_gradient_is_reinforce_and_float_mask_weights(backend):
    logp, _, _, adv, mask = loss_inputs(N=70)
    w = torch.rand(70, generator=torch.Generator().manual_seed(5), device="cpu").to(DEV) * mask
    loss, st = grpo_token_loss(logp, None, None, adv, w, 0.2, 0.2, 0.0, backend=backend, return_stats=True)
    g, = torch.autograd.grad(loss.sum(), logp)
    keep = w != 0
    assert torch.allclose(g[keep], -adv[keep] * w[keep]) and (g[~keep] == 0).all()  # -A * weight (P9)
    assert torch.allclose(loss[keep], -adv[keep] * w[keep])
    assert st.clipped_low.sum() == 0 and st.clipped_high.sum() == 0  # ratio == 1: nothing clipped


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_k3_is_zero_at_ref_and_bf16_logp(backend):
    logp = torch.linspace(-3, 0, 11)
    loss = grpo_token_loss(logp, None, logp.clone(), torch.zeros(11), torch.ones(11), 0.2, 0.2, 1.0,
                                   backend=backend)
    assert (loss == 0).all()
    if backend == "torch":
        return  # the trainer's loss sees fp32 log-probs (the kernel's output); bf16 inputs are the fused kernel's
    lp, old, ref, adv, mask = (x.detach().to(torch.bfloat16) if x.is_floating_point() else x for x in loss_inputs())
    lp.requires_grad_(True)
    a = grpo_token_loss(lp.view(10, 15), old.view(10, 15), ref.view(10, 15), adv.view(10, 15),
                                mask.view(10, 15), 0.2, 0.28, 0.05, backend=backend)
    b = grpo_token_loss_reference(lp, old, ref, adv, mask, 0.2, 0.28, 0.05)[0]
    assert a.shape == (10, 15) and a.dtype == torch.float32 and (a.reshape(-1).double() - b).abs().max() < 1e-6
    g, = torch.autograd.grad(a.sum(), lp)
    assert g.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_one_rare_token_cannot_blow_up_the_step(backend):
    """k3 = exp(ref - logp) - (ref - logp) - 1 is unbounded: a sampled token the policy gives 1e-6 and the
    reference 0.5 had k3 ~ 5e5 (swamping the surrogate), and ref - logp > 88 made it inf (a skipped step). Capped
    at K3_MAX per token, with no gradient where the cap binds, and counted."""
    from kernels.grpo_loss import K3_MAX
    logp = torch.tensor([math.log(1e-6), -100.0, -0.7, -0.69, 0.0, -50.0], requires_grad=True)
    ref = torch.tensor([math.log(0.5), 0.0, -0.69, -0.7, -20.0, -49.0])
    adv, mask = torch.tensor([1.0, -1.0, 0.5, 0.5, 1.0, 0.0]), torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    loss, st = grpo_token_loss(logp, None, ref, adv, mask, 0.2, 0.2, 0.04, backend=backend,
                                       return_stats=True)
    g, = torch.autograd.grad(loss.sum(), logp)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert st.kl_capped.tolist() == [1, 1, 0, 0, 1, 0] and st.kl.max() == K3_MAX
    assert loss[0].item() == pytest.approx(-1.0 + 0.04 * K3_MAX) and g[0].item() == pytest.approx(-1.0)  # -A only
    assert g[4].item() == pytest.approx(-1.0)  # d = -20: k3 = e^-20 + 19 > K3_MAX, capped too
    for i in (2, 3):  # small d: the exact k3 and its gradient, against float64
        d = ref[i].double() - logp[i].double()
        assert st.kl[i].item() == pytest.approx((d.exp() - d - 1).item(), abs=1e-6)  # fp32 cancellation
        assert g[i].item() == pytest.approx(-0.5 + 0.04 * (1 - d.exp().item()), abs=1e-6)
    b, _, _, kl, cap = grpo_token_loss_reference(logp, None, ref, adv, mask, 0.2, 0.2, 0.04)
    assert (loss.double() - b).abs().max() < 1e-6 and (cap == st.kl_capped.double()).all()


def test_k3_estimates_the_kl():
    g = torch.Generator().manual_seed(0)  # Monte Carlo: E_{x~pi}[k3(x)] == KL(pi || ref) on a small categorical
    pi, ref = torch.tensor([0.5, 0.3, 0.2], device="cpu"), torch.tensor([0.2, 0.2, 0.6], device="cpu")
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    pi, ref, x = pi.to(DEV), ref.to(DEV), x.to(DEV)
    k3 = grpo_token_loss(pi.log()[x], None, ref.log()[x], torch.zeros(len(x)), torch.ones(len(x)),
                                 0.2, 0.2, 1.0, backend="torch")
    kl = (pi * (pi / ref).log()).sum()
    assert (k3 >= 0).all() and k3.mean() == pytest.approx(kl.item(), rel=0.02)


def test_grpo_token_loss_errors():
    logp, old, ref, adv, mask = loss_inputs(N=10)
    with pytest.raises(ValueError, match="advantages has shape"):
        kernels.grpo_token_loss(logp, old, ref, adv[:5], mask, 0.2, 0.2, 0.0)
    with pytest.raises(ValueError, match="eps_low"):
        kernels.grpo_token_loss(logp, old, ref, adv, mask, -0.1, 0.2, 0.0)
    with pytest.raises(ValueError, match="beta"):
        kernels.grpo_token_loss(logp, old, ref, adv, mask, 0.2, 0.2, -1.0)
    with pytest.raises(ValueError, match="backend"):
        kernels.grpo_token_loss(logp, old, ref, adv, mask, 0.2, 0.2, 0.0, backend="fast")


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_paper_epsilon_ten_leaves_only_the_upper_clip(backend):
    """The paper's clip epsilon is 10: the lower bound 1 - 10 < 0 never binds, the upper one (11) still can."""
    logp = torch.zeros(4, requires_grad=True)
    old = torch.log(torch.tensor([1 / 0.01, 1 / 0.01, 1 / 20.0, 1 / 20.0]))  # ratios 0.01, 0.01, 20, 20
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    loss, st = grpo_token_loss(logp, old, None, adv, torch.ones(4), 10.0, 10.0, 0.0, backend=backend,
                                       return_stats=True)
    g, = torch.autograd.grad(loss.sum(), logp)
    assert st.clipped_low.sum() == 0 and st.clipped_high.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert g[2] == 0 and g[0] == pytest.approx(0.01) and g[1] == pytest.approx(-0.01) and g[3] == pytest.approx(20.0)


# ----------------------------------------------------------------------------------------------------------------
# First use on a GPU: each kernel checks itself against its float64 twin, and the trainer's loss against its
# definition on a real micro-batch; a kernel that fails is not used on that device (on CPU: the same code, in the
# interpreter, with the "is this a GPU" answer forced)


@needs_triton
def test_self_checks_pass_and_catch_a_broken_kernel(monkeypatch):
    dev = torch.device(DEV)
    assert kernels.selfcheck.token_logprobs_check(dev, N=40, D=24, V=50) is None
    assert kernels.selfcheck.grpo_token_loss_check(dev, N=150) is None
    fwd = kernels.logprob._triton_forward  # a kernel whose log-probs are off by 1e-3
    monkeypatch.setattr(kernels.logprob, "_triton_forward", lambda *a: (lambda o: (o[0] + 1e-3, *o[1:]))(fwd(*a)))
    assert kernels.selfcheck.token_logprobs_check(dev, N=40, D=24, V=50).startswith("logp off by")
    apply = kernels.grpo_loss.GRPOTokenLoss.apply  # a loss kernel whose gradient is 0.1% too large

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.001
    monkeypatch.setattr(kernels.grpo_loss.GRPOTokenLoss, "apply",
                        lambda logp, *a: apply(Scaled.apply(logp), *a))
    assert kernels.selfcheck.grpo_token_loss_check(dev, N=150).startswith("d/dlogp off by")


def test_auto_backend_trusts_a_kernel_only_after_its_check(monkeypatch):
    runs = []

    def check(ok):
        def f(device):
            runs.append(device)
            if ok is None:
                raise RuntimeError("no kernel image for this GPU")
            return None if ok else "logp off by 1e-2"
        return f
    monkeypatch.setattr(_backend, "_trusted", {})
    cpu = torch.device("cpu")
    monkeypatch.setitem(_backend.SELF_CHECKS, "kernels.good", check(True))
    assert _backend.trusted("kernels.good", cpu) and _backend.trusted("kernels.good", cpu) and len(runs) == 1
    for name, ok, why in (("kernels.bad", False, "logp off by 1e-2"), ("kernels.crash", None, "no kernel image")):
        monkeypatch.setitem(_backend.SELF_CHECKS, name, check(ok))
        with pytest.warns(RuntimeWarning, match=f"{name}: the Triton kernel failed .*{why}.*torch path"):
            assert not _backend.trusted(name, cpu)
        assert not _backend.trusted(name, cpu)  # decided once per device: no second run, no second warning
    assert len(runs) == 3 and set(_backend.SELF_CHECKS) >= {"kernels.token_logprobs", "kernels.grpo_token_loss"}


@needs_triton
def test_trainer_loss_uses_the_fused_kernel_only_if_it_matches_the_definition(monkeypatch):
    import loss
    logp, old, ref, adv, mask = loss_inputs()
    want, _ = grpo_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.04)
    monkeypatch.setattr(kernels, "use_triton", lambda *a, **k: True)  # as on a GPU
    monkeypatch.setattr(loss, "_fused_ok", {})
    calls = []
    fused = kernels.grpo_token_loss
    monkeypatch.setattr(kernels, "grpo_token_loss", lambda *a, **k: calls.append(1) or fused(*a, **k))
    got, st = loss.grpo_loss_auto(logp, old, ref, adv, mask, 0.2, 0.28, 0.04)
    assert (got - want).abs().max() < 1e-6 and len(calls) == 2  # the check, then the micro-batch itself
    assert loss._fused_ok == {str(logp.device): True}
    # a kernel that is 1% off: warned once, then the definition, exactly
    monkeypatch.setattr(loss, "_fused_ok", {})
    monkeypatch.setattr(kernels, "grpo_token_loss", lambda *a, **k: (lambda o: (o[0] * 1.01, o[1]))(fused(*a, **k)))
    with pytest.warns(RuntimeWarning, match="disagrees with loss.grpo_loss"):
        got, _ = loss.grpo_loss_auto(logp, old, ref, adv, mask, 0.2, 0.28, 0.04)
    assert torch.equal(got, want) and loss._fused_ok == {str(logp.device): False}
    got, _ = loss.grpo_loss_auto(logp, old, ref, adv, mask, 0.2, 0.28, 0.04)
    assert torch.equal(got, want)
