"""A learned reward model (DeepSeek-R1's all-scenario stage): our Transformer, its scalar head one row of the LM head.

    r(prompt, response) = h_last . W_lm_head[end-of-text]

read at the end-of-text appended to prompt + response. Why a row of the LM head and not a new head: a reward model
is then an ordinary checkpoint (hf.save/hf.load, FSDP sharding and --resume work unchanged), and it starts from a
head the language model already trained rather than a random one. sft.py --objective=preference trains it
on preference pairs with the Bradley-Terry loss; grpo.py reads it for general prompts (--rm-helpful/--rm-harmless).
"""
import torch
import torch.nn.functional as F

import data
import dist
import rewards
import toy


def reward_seq(prompt, response, eot_id, T):
    """The ids a reward is read from: prompt + response + end-of-text. Longer than T tokens: the first T - 1, then
    the end-of-text, so the score is always read at an end-of-text the model saw; what was cut is not judged (a
    pair cut inside its common prompt then ties and carries no gradient)."""
    s = prompt + response
    return s[:T - 1] + [eot_id] if len(s) >= T else s + [eot_id]


def reward_ids(tok, prompt, response, max_len):
    """reward_seq of texts: the bare prompt (no template: as sft.py encodes preference pairs) and the response."""
    return reward_seq(data.prompt_ids(tok, prompt), tok.encode(response), tok.eot_id, max_len)


def pad_right(seqs):
    """Token-id lists -> ids (B, L) right-padded with 0 and valid (B, L): the real positions, from the lengths."""
    x = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True)  # (B, L)
    return x, torch.arange(x.shape[1]) < torch.tensor([len(s) for s in seqs])[:, None]


def seq_rewards(model, x, valid, eot_id):
    """ids (B, L) right-padded, valid (B, L) -> rewards (B,) fp32, read at each row's own last real position (from
    its length, never from token values: an end-of-text may occur inside a response, padding ids mean nothing, P3).
    Under FSDP call it inside dist.gathered(model) (or through the root module's forward, as sft.py does)."""
    h = model(x, return_hidden=True, valid=valid)  # (B, L, D)
    h_last = h[torch.arange(len(x), device=x.device), valid.sum(1) - 1].float()  # (B, D)
    return (h_last * model.lm_head.weight[eot_id].float()).sum(-1)  # (B,); elementwise: no bf16 matmul (M8)


def reward_scores(model, seqs, eot_id):
    """Token-id lists (each ending with its end-of-text, as reward_ids makes them) -> rewards (B,) fp32."""
    dev = model.lm_head.weight.device
    x, valid = pad_right(seqs)
    return seq_rewards(model, x.to(dev), valid.to(dev), eot_id)


def bt_loss_sum(r_chosen, r_rejected):
    """Bradley-Terry: r_chosen, r_rejected (n,) -> (sum of -log sigmoid(r_chosen - r_rejected), the number of pairs
    ranked right: r_chosen > r_rejected, a tie counting as wrong). The caller divides by the step's pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).sum(), int((r_chosen > r_rejected).sum())


def general_rewards(tok, texts, exs, rms, format_weight, sums):
    """R1's reward of general outputs (paper Eq. 8-10: R_general = R_RM + R_format): the helpful reward model on the
    reply (the answer block, R1's final summary), the harmless one on the whole response, plus the format reward.
    The toy's hidden rule (toy.py) is only logged beside them, never rewarded: the reward models' scores rising
    while the rule's fall is over-optimisation of the reward models (reward hacking). -> (totals, format rewards);
    sums (a dict of floats) gathers the per-step sums grpo.py logs."""
    fmt = [rewards.format_reward(t) for t in texts]
    total = [format_weight * f for f in fmt]
    for kind, model in rms.items():
        views = [toy.reply_of(t) if kind == "helpful" else t for t in texts]
        seqs = [reward_ids(tok, e.prompt, v, model.config.max_position_embeddings)
                for e, v in zip(exs, views)]
        with torch.no_grad(), dist.gathered(model):
            scores = reward_scores(model, seqs, tok.eot_id).tolist()
        total = [t + s for t, s in zip(total, scores)]
        sums[f"rm_{kind}"] += sum(scores)
    sums["outputs"] += len(texts)
    hidden = [t for t, e in zip(texts, exs) if e.meta.get("source") == "toy-general"]  # the toy's prompts only
    sums["hidden_outputs"] += len(hidden)
    sums["hidden_helpful"] += sum(map(toy.hidden_helpful, hidden))
    sums["hidden_harmless"] += sum(map(toy.hidden_harmless, hidden))
    return total, fmt


def general_metrics(sums, kinds):
    """One step's general-output metrics from general_rewards' sums, added over every rank (a collective: every rank
    calls it): the reward models' mean scores (kinds: those in use) and the toy's hidden rule beside them."""
    keys = ("outputs", "hidden_outputs", "hidden_helpful", "hidden_harmless", "rm_helpful", "rm_harmless")
    s = {k: dist.all_reduce_sum(sums.get(k, 0.0)) for k in keys}
    if not s["outputs"]:
        return {}
    met = {"general_outputs": int(s["outputs"])} | {f"rm_{k}": s[f"rm_{k}"] / s["outputs"] for k in kinds}
    if s["hidden_outputs"]:
        met |= {k: s[k] / s["hidden_outputs"] for k in ("hidden_helpful", "hidden_harmless")}
    return met
