"""Per-token log-prob (and entropy) of the sampled tokens, fused with the LM head.

    z_ij    = (h_i . W_j) / temperature                  j < V (= vocab_limit; padded LM-head rows are not logits)
    logp_i  = z_i,t_i - logsumexp_j z_ij
    H_i     = -sum_j p_ij log p_ij,   p = softmax(z)

Forward: one pass over vocabulary tiles per block of rows keeps three running numbers per row (max m, s = sum
e^(z-m), u = sum e^(z-m)(z-m)) and the target logit, so neither backend ever holds the (N, V) logits. Entropy is
log s - u/s, which avoids the cancellation of lse - E[z] when logits are large (all-negative logits, P20).
Backward, with g = dL/dlogp and k = dL/dH:
    dL/dz_ij = g_i (1[j = t_i] - p_ij) - k_i p_ij (log p_ij + H_i)
recomputed for one chunk of rows at a time into a reused (rows, V) buffer, then dh = dz @ W and dW += dz^T @ h
with ordinary matmuls (deterministic: no atomics). Without an entropy gradient the torch path keeps p - onehot in
the buffer and applies the row scale -g/T to the small (rows, D) operands instead. The (N, V) logits never exist;
at most one chunk of rows does. GPU cost on paper: see kernels/__init__.py.

Triton path: `_fwd_kernel` (grid: row blocks x vocabulary splits; the splits' partial (m, s, u, z_t) are merged in
torch) and `_grad_logits_kernel` (grid: row blocks x vocabulary tiles of one chunk). Torch path: the same math,
chunk of rows by chunk of rows. Both accumulate logits in fp32 whatever the input dtype (PITFALLS M8); float64
inputs stay float64 on the torch path (for references).
"""
import math

import torch

from ._backend import INTERPRET, jit, tl, triton, use_triton

# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


@jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, temperature,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of h @ W.T / temperature; the K loop runs over D in BLOCK_D steps."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ks = d0 + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # W tile loaded already transposed: (BLOCK_D, BLOCK_V)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot multiplies raw bit patterns (PITFALLS M7)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc / temperature  # divide, exactly like the sampler's logits / T


@jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, part_ptr, N, V, D, stride_h, stride_w, temperature, v_per_split,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: rows * stride passes 2^31 at real N
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)  # finite start: (m - m_new) * s stays 0 * finite, not NaN
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, temperature,
                         BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))  # finite: every tile has a valid column
        zc = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(zc), 0.0)  # selects, so padded columns never make 0 * inf
        alpha = tl.exp(m - m_new)
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * zc, 1)
        s = alpha * s + tl.sum(e, 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    offs = pid_s * N + rows  # part is (4, n_splits, N)
    tl.store(part_ptr + offs, m, mask=row_ok)
    tl.store(part_ptr + n_splits * N + offs, s, mask=row_ok)
    tl.store(part_ptr + 2 * n_splits * N + offs, u, mask=row_ok)
    tl.store(part_ptr + 3 * n_splits * N + offs, zt, mask=row_ok)


@jit
def _grad_logits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, gz_ptr, N, V, D,
                        stride_h, stride_w, stride_g, temperature, HAS_ENT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: see _fwd_kernel
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, temperature,
                     BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
    lp = z - tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]  # log p
    p = tl.exp(lp)
    g = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    dz = tl.where(cols[None, :] == tgt[:, None], g, 0.0) - g * p
    if HAS_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)[:, None]
        k = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)[:, None]
        dz -= k * p * (lp + ent)
    dz = dz / temperature  # chain rule through z = logits / T
    tl.store(gz_ptr + rows[:, None] * stride_g + cols[None, :], dz.to(gz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _launch_cfg(x):
    """Block sizes: tiny in the interpreter (tests), GEMM-sized on GPU (not tuned; see kernels/__init__.py)."""
    interp, fp32 = INTERPRET and not x.is_cuda, x.dtype == torch.float32
    blocks = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16) if interp else dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64,
                                                                          num_warps=8, num_stages=3)
    return dict(blocks, UPCAST=interp and not fp32, PRECISION="ieee" if fp32 else None)


def _triton_forward(h, w, tgt, temperature, vocab_splits):
    """(logp, lse, entropy), each (N,) fp32, from the split-vocabulary kernel and a small torch merge."""
    (N, D), V = h.shape, w.shape[0]
    cfg = _launch_cfg(h)
    row_blocks, vocab_tiles = triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"])
    if vocab_splits is None:  # enough programs for ~2 waves on the GPU; small N then splits the vocabulary
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 1
        vocab_splits = triton.cdiv(2 * sms, row_blocks)
    tiles_per_split = triton.cdiv(vocab_tiles, max(1, min(vocab_splits, vocab_tiles)))
    v_per_split = tiles_per_split * cfg["BLOCK_V"]
    n_splits = triton.cdiv(V, v_per_split)  # every split starts below V, so none is empty
    part = torch.empty(4, n_splits, N, device=h.device, dtype=torch.float32)
    _fwd_kernel[(row_blocks, n_splits)](h, w, tgt, part, N, V, D, h.stride(0), w.stride(0), temperature,
                                        v_per_split, **cfg)
    m, s, u, zt = part.unbind(0)  # (n_splits, N) each
    m_all = m.amax(0)  # merge the splits' running stats exactly as the kernel merges tiles
    scale = torch.exp(m - m_all)
    s_all = (scale * s).sum(0)
    u_all = (scale * (u + (m - m_all) * s)).sum(0)
    lse = m_all + torch.log(s_all)
    return zt.sum(0) - lse, lse, torch.log(s_all) - u_all / s_all


def _triton_grad_logits(h, w, tgt, lse, ent, g_logp, g_ent, temperature, buf):
    """(dL/dz, None) for one chunk of rows, written into the reused buffer buf[0, :C]."""
    (N, D), V = h.shape, w.shape[0]
    gz = buf[0, :N]
    cfg = _launch_cfg(h)
    has_ent = g_ent is not None
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _grad_logits_kernel[grid](h, w, tgt, lse, ent if has_ent else lse, g_logp, g_ent if has_ent else g_logp, gz,
                              N, V, D, h.stride(0), w.stride(0), gz.stride(0), temperature, has_ent, **cfg)
    return gz, None


# ----------------------------------------------------------------------------------------------------------------
# torch path: the same math, one chunk of rows at a time


def _torch_logits(h, w_c, temperature, out):
    """(C, V) logits in the compute dtype, written into a buffer reused by every chunk: fresh (C, V) allocations
    are page-faulted in from the OS each time on CPU, which costs as much as the elementwise work."""
    z = torch.mm(h.to(w_c.dtype), w_c.T, out=out)
    return z if temperature == 1.0 else z.div_(temperature)


def _torch_forward(h, w, tgt, temperature, chunk, want_ent):
    cdt = torch.promote_types(h.dtype, torch.float32)
    w_c = w.to(cdt)  # one upcast copy of W for all chunks (no copy when W is already fp32)
    (N, _), V = h.shape, w.shape[0]
    logp, lse = (torch.empty(N, device=h.device, dtype=cdt) for _ in range(2))
    ent = torch.empty(N if want_ent else 0, device=h.device, dtype=cdt)
    buf = torch.empty(2, min(chunk, N), V, device=h.device, dtype=cdt)
    for c0 in range(0, N, chunk):
        c1 = min(c0 + chunk, N)
        z = _torch_logits(h[c0:c1], w_c, temperature, buf[0, :c1 - c0])  # (C, V)
        m = z.amax(1, keepdim=True)  # (C, 1)
        e = torch.exp(z.sub_(m), out=buf[1, :c1 - c0])  # z is now z - m; e = exp(z - m)
        s = e.sum(1, keepdim=True)  # (C, 1)
        log_s = s.log()
        lse[c0:c1] = (m + log_s).squeeze(1)
        logp[c0:c1] = (z.gather(1, tgt[c0:c1, None]) - log_s).squeeze(1)
        if want_ent:  # log s - u / s, as in the Triton kernel
            ent[c0:c1] = (log_s - e.mul_(z).sum(1, keepdim=True) / s).squeeze(1)
    return logp, lse, ent


def _torch_grad_logits(h, w_c, tgt, lse, ent, g_logp, g_ent, temperature, buf):
    """(M, r) with dL/dz = diag(r) M, so the row scaling is applied to the small (C, D) matmul operands instead of
    a pass over (C, V). Without an entropy gradient M = p - onehot and r = -g / T."""
    C = h.shape[0]
    # log p = logits / T - lse in one matmul (addmm's alpha and broadcast bias), no extra pass over (C, V)
    lp = torch.addmm(-lse[:, None], h.to(w_c.dtype), w_c.T, alpha=1.0 / temperature, out=buf[0, :C])
    if g_ent is None:
        pm = lp.exp_().scatter_add_(1, tgt[:, None], torch.full((C, 1), -1.0, dtype=lp.dtype, device=lp.device))
        return pm, -g_logp / temperature
    p = torch.exp(lp, out=buf[1, :C])
    dz = lp.add_(ent[:, None]).mul_(p).mul_(-g_ent[:, None])  # -k p (log p + H)
    dz.addcmul_(p, g_logp[:, None], value=-1)  # - g p
    dz.scatter_add_(1, tgt[:, None], g_logp[:, None])  # + g at the target
    return dz, torch.full_like(g_logp, 1.0 / temperature)


# ----------------------------------------------------------------------------------------------------------------
# autograd


class TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, tgt, temperature, want_ent, triton_, chunk, vocab_splits):
        if triton_:
            logp, lse, ent = _triton_forward(h, w, tgt, temperature, vocab_splits)
        else:
            logp, lse, ent = _torch_forward(h, w, tgt, temperature, chunk, want_ent)
        ctx.save_for_backward(h, w, tgt, lse, ent)
        ctx.opts = (temperature, triton_, chunk)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, tgt, lse, ent = ctx.saved_tensors
        temperature, triton_, chunk = ctx.opts
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_logp, g_ent = g_logp.to(lse.dtype).contiguous(), None if g_ent is None else g_ent.to(lse.dtype).contiguous()
        # matmul dtype: fp32 (or fp64) on CPU, where bf16 matmuls are slow; the input dtype on GPU (fp32 accumulate)
        mdt = w.dtype if w.is_cuda else lse.dtype
        w_m = w.to(mdt)
        w_c = None if triton_ else w.to(lse.dtype)  # torch path recomputes logits in fp32 (w_m itself on CPU)
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.empty(h.shape, device=h.device, dtype=mdt) if need_h else None
        dw = torch.zeros(w.shape, device=w.device, dtype=lse.dtype) if need_w else None  # fp32 over chunks
        buf = torch.empty(1 if triton_ or g_ent is None else 2, min(chunk, h.shape[0]), w.shape[0],
                          device=h.device, dtype=mdt if triton_ else lse.dtype)  # (k, C, V), reused per chunk
        for c0 in range(0, h.shape[0], chunk):
            sl = slice(c0, min(c0 + chunk, h.shape[0]))
            args = (tgt[sl], lse[sl], ent[sl], g_logp[sl], None if g_ent is None else g_ent[sl], temperature, buf)
            # dL/dz = diag(r) M for this chunk of rows (r None: M is dL/dz); M is (C, V), the rest is (C, D)
            M, r = _triton_grad_logits(h[sl], w, *args) if triton_ else _torch_grad_logits(h[sl], w_c, *args)
            M, h_c = M.to(mdt), h[sl].to(mdt)
            if need_h:
                torch.mm(M, w_m, out=dh[sl])
                if r is not None:
                    dh[sl] *= r[:, None].to(mdt)
            if need_w:
                h_c = h_c if r is None else h_c * r[:, None].to(mdt)
                if dw.dtype == mdt:
                    dw.addmm_(M.T, h_c)
                else:  # bf16 matmul on GPU, accumulated across chunks in fp32 (add_ promotes, no fp32 temp)
                    dw.add_(M.T @ h_c)
        return (dh.to(h.dtype) if need_h else None, dw.to(w.dtype) if need_w else None,
                None, None, None, None, None, None)


def token_logprobs(hidden, weight, targets, temperature=1.0, backend="auto", return_entropy=False, *,
                   vocab_limit=None, chunk=None, vocab_splits=None):
    """Log-prob of `targets` under softmax(hidden @ weight[:vocab_limit].T / temperature), never holding (N, V).

    hidden (..., D) final hidden states (after the final norm); weight (V_padded, D) the LM head; targets (...) int
    ids. Returns logp (...) fp32 (fp64 for fp64 inputs on the torch path), or (logp, entropy) with return_entropy.
    vocab_limit: rows of `weight` at and beyond it (LM-head padding past the tokenizer's vocabulary) are excluded
    from the softmax. The sampler never samples them because it masks them out of *its* softmax (PITFALLS P15), so
    the trainer must normalise over the same support or sampler and trainer log-probs disagree by log(mass of the
    padded rows); those rows get exactly zero gradient. chunk: rows per chunk (torch forward; both backwards;
    default: 64 MB (CPU) / 4 GB (GPU) of fp32 logits' worth of rows).
    vocab_splits: Triton forward programs per row block along the vocabulary (default: fill the GPU).
    """
    where = "kernels.token_logprobs"
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden {tuple(hidden.shape)} must be (..., D) and weight {tuple(weight.shape)} "
                         "(V, D) with the same D")
    if targets.shape != hidden.shape[:-1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{where}: targets {tuple(targets.shape)} {targets.dtype} must be an integer tensor of "
                         f"shape {tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(f"{where}: hidden {hidden.dtype} and weight {weight.dtype} must share a float dtype")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: temperature={temperature!r} must be a positive number (greedy T=0 has no "
                         "log-probs)")
    V = weight.shape[0] if vocab_limit is None else int(vocab_limit)
    if not 0 < V <= weight.shape[0]:
        raise ValueError(f"{where}: vocab_limit={vocab_limit} must be in [1, {weight.shape[0]}]")
    triton_ = use_triton(backend, hidden, weight, targets, where=where) and targets.numel() > 0
    if triton_ and hidden.dtype == torch.float64:
        raise ValueError(f"{where}: backend='triton' does not take float64; use backend='torch'")
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    w = weight[:V].contiguous()  # a view of a contiguous head: the padded rows get zero gradient
    tgt = targets.reshape(-1).to(torch.int64).contiguous()
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= V):
        raise ValueError(f"{where}: target ids must lie in [0, {V}) (vocab_limit), got [{int(tgt.min())}, "
                         f"{int(tgt.max())}]")
    chunk = max(16, (2**32 if h.is_cuda else 2**26) // (4 * V)) if chunk is None else chunk  # 64 MB CPU, 4 GB GPU
    if chunk < 1:
        raise ValueError(f"{where}: chunk={chunk} must be >= 1")
    logp, ent = TokenLogprobs.apply(h, w, tgt, float(temperature), return_entropy, triton_, int(chunk),
                                    vocab_splits)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp
