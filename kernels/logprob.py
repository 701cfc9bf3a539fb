"""Per-token log-probs (and entropies) of targets under an LM head, without keeping (N, V) logits.

token_logprobs(hidden (N, D), weight (V, D), targets (N,), temperature) -> logp (N,) fp32 [, entropy (N,)]
  logits = hidden @ weight.T / temperature, accumulated in fp32 whatever the input dtype (PITFALLS M8);
  logp = logits[target] - logsumexp(logits); entropy = -sum softmax * log_softmax.
The torch path works on `chunk` rows at a time: only (chunk, V) fp32 logits are alive, in the forward and in the
backward, which recomputes each chunk's logits instead of storing them (a custom autograd.Function: autograd
would keep every chunk's softmax for the backward). Gradients: d logp / d z = onehot - p and
d H / d z = -p (log p + H), both divided by the temperature, then chained through the matmul.
Restricting the vocabulary (a padded LM head) is done by the caller: pass weight[:vocab].
"""
import torch


def _acc(dtype):  # accumulate in fp32 at least (fp64 stays fp64, for exact tests)
    return torch.promote_types(dtype, torch.float32)


def _chunk_stats(h, w, t, temperature):
    dt = _acc(h.dtype)
    z = (h.to(dt) @ w.to(dt).T) / temperature  # (C, V) fp32
    lse = torch.logsumexp(z, dim=-1)  # (C,)
    logp = z.gather(1, t[:, None]).squeeze(1) - lse
    return z, lse, logp


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, with_entropy):
        N = hidden.shape[0]
        logp = torch.empty(N, dtype=_acc(hidden.dtype), device=hidden.device)
        ent = torch.empty(N, dtype=_acc(hidden.dtype), device=hidden.device) if with_entropy else None
        for s in range(0, N, chunk):
            z, lse, lp = _chunk_stats(hidden[s:s + chunk], weight, targets[s:s + chunk], temperature)
            logp[s:s + chunk] = lp
            if with_entropy:  # -sum p log p on log-softmax values: no cancellation of two large terms
                logq = z - lse[:, None]
                ent[s:s + chunk] = -(torch.exp(logq) * logq).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, logp, ent if with_entropy else logp)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        return (logp, ent) if with_entropy else (logp, logp.new_empty(0))

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, logp, ent = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        dt = _acc(hidden.dtype)
        gh = torch.zeros(hidden.shape, dtype=dt, device=hidden.device) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(weight.shape, dtype=dt, device=weight.device) if ctx.needs_input_grad[1] else None
        wf = weight.to(dt)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            z, lse, _ = _chunk_stats(h, weight, t, T)
            logq = z - lse[:, None]  # (C, V) log-softmax
            p = torch.exp(logq)
            gl = g_logp[s:s + chunk, None].to(dt)
            gz = -p * gl  # d logp / dz = onehot - p
            gz.scatter_add_(1, t[:, None], gl)
            if ctx.with_entropy and g_ent is not None and g_ent.numel():
                gz -= g_ent[s:s + chunk, None].to(dt) * p * (logq + ent[s:s + chunk, None])
            gz /= T  # z = logits / T
            if gh is not None:
                gh[s:s + chunk] = gz @ wf
            if gw is not None:
                gw += gz.T @ h.to(dt)
        return (gh.to(hidden.dtype) if gh is not None else None, gw.to(weight.dtype) if gw is not None else None,
                None, None, None, None)


def token_logprobs_torch(hidden, weight, targets, temperature=1.0, return_entropy=False, chunk=1024):
    logp, ent = _TokenLogprobs.apply(hidden, weight, targets, float(temperature), chunk, return_entropy)
    return (logp, ent) if return_entropy else logp


def token_logprobs_reference(hidden, weight, targets, temperature=1.0):
    """float64, all logits at once: the naive twin for tests."""
    z = (hidden.double() @ weight.double().T) / temperature
    lq = torch.log_softmax(z, -1)
    return lq.gather(1, targets[:, None]).squeeze(1), -(lq.exp() * lq).sum(-1)
