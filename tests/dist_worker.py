"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU): one GRPO optimizer step and a
greedy generation with an FSDP2-sharded model, written to <out>/rank<r>.pt for the test to compare with one
process doing the same work. Usage: torchrun ... tests/dist_worker.py <out_dir>"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import checkpoint  # noqa: E402
import dist  # noqa: E402
import grpo  # noqa: E402
import hf  # noqa: E402
import optim  # noqa: E402
import rollout  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

VOCAB = 200


def tiny(vocab=256):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
                      moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return Transformer(cfg)


def rows(n=8):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        P, L = 3 + i % 3, 2 + (i * 5) % 7
        out.append(dict(prompt=torch.randint(0, VOCAB, (P,), generator=g).tolist(),
                        completion=torch.randint(0, VOCAB, (L,), generator=g).tolist(), sampler_logp=[0.0] * L,
                        adv=float(torch.randn(1, generator=g)), masked=i == 5, old_logp=None, experts=None,
                        truncated=False))
    return out


PROMPTS = [[5, 17, 42, 9, 100], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 12]]


def one_step(agg, sharded, beta=0.05, zero=(), skip=False):
    """One GRPO optimizer step with a live KL term (unless beta=0), on this rank's share of the 8 rows (all of them
    when not sharded), rows `zero` with advantage 0. Returns (loss summed over ranks, grad norm, policy)."""
    c = grpo.GRPOConfig(**{**grpo.GRPOConfig().__dict__, **grpo.PRESETS["cpu"], "init_from": "x", "beta": beta,
                           "micro_batch_size": 2, "loss_agg": agg, "skip_zero_adv": skip})
    policy, ref = tiny().train(), tiny().eval().requires_grad_(False)
    with torch.no_grad():  # a reference different from the policy, so the KL term is live
        for p in ref.parameters():
            p.mul_(0.9)
    r, w = (dist.rank(), dist.world_size()) if sharded else (0, 1)
    if sharded:
        policy, ref = dist.shard_model(policy), dist.shard_model(ref)
    opt = optim.adamw(policy, 1e-2, 0.1)
    mine = [{**x, "adv": 0.0 if i in zero else x["adv"]} for i, x in enumerate(rows())][r * 8 // w:(r + 1) * 8 // w]
    b = rollout.make_batch(*([r[k] for r in mine] for k in ("prompt", "completion", "sampler_logp", "adv")),
                        keep=[not r["masked"] for r in mine])
    m = grpo.train_step(policy, ref, opt, b, c, VOCAB, on_policy=True)
    return dist.all_reduce_sum(m["loss"]) if sharded else m["loss"], m["grad_norm"], policy


AGGS = ("token_mean", "seq_mean_token_mean", "dr_grpo")
# --skip-zero-adv against the same step unskipped in one process: rank 1's rows all at advantage 0 (it runs filler
# micro-batches while rank 0 trains), then every row (no forward at all; AdamW steps on zero gradients)
SKIPS = {"skip_rank1": range(4, 8), "skip_all": range(8)}


def run(out_dir):
    dist.init_distributed()
    torch.set_num_threads(1)
    r, w = dist.rank(), dist.world_size()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    res = {}
    for agg in AGGS:  # every loss aggregation: its normaliser is all-reduced over ranks (PITFALLS P8)
        loss, gnorm, policy = one_step(agg, sharded=True)
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        res[agg] = {"loss": loss, "grad_norm": gnorm, "params": {k: v.clone() for k, v in full.items()}}
    for name, zero in SKIPS.items():
        loss, gnorm, p = one_step("token_mean", sharded=True, beta=0.0, zero=zero, skip=True)
        full = get_model_state_dict(p, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        res[name] = {"loss": loss, "grad_norm": gnorm, "params": {k: v.clone() for k, v in full.items()}}
    policy.eval()  # the last policy: the whole state dict sits on rank 0 (empty on the others)
    with dist.gathered(policy):  # each rank generates for its own prompts, weights gathered once
        gen = rollout.generate(policy, PROMPTS[r::w], max_new_tokens=6 + 3 * r, temperature=0, stop_ids=[3])
    torch.save({"aggs": res, "tokens": gen.tokens}, os.path.join(out_dir, f"rank{r}.pt"))


def reference(out_dir):
    """The same work in one process: the whole batch, every prompt."""
    res = {}
    for agg in AGGS:
        loss, gnorm, policy = one_step(agg, sharded=False)
        res[agg] = {"loss": loss, "grad_norm": gnorm, "params": policy.state_dict()}
    for name, zero in SKIPS.items():
        loss, gnorm, p = one_step("token_mean", sharded=False, beta=0.0, zero=zero)
        res[name] = {"loss": loss, "grad_norm": gnorm, "params": p.state_dict()}
    policy.eval()
    gens = [rollout.generate(policy, [p], max_new_tokens=6 + 3 * (i % 2), temperature=0, stop_ids=[3]).tokens[0]
            for i, p in enumerate(PROMPTS)]
    return {"aggs": res, "tokens": gens}


def dynamic(base, out_dir):
    """Dynamic sampling on 2 ranks where only rank 0 sees zero-variance groups: ranks must not disagree about
    refill rounds (a collective one rank skips would hang)."""
    import rewards
    calls = []

    def rigged(completions, examples, weights=None, **kw):
        calls.append(len(completions))
        flat = dist.rank() == 0 and len(calls) == 1  # rank 0's first round: every group constant
        r = [1.0 if flat else float(i % 2) for i in range(len(completions))]
        return r, {"accuracy": r, "format": [0.0] * len(r), "language": [None] * len(r)}, {}
    rewards.score_batch = rigged
    grpo.main(["--preset=cpu", f"--init-from={base}", f"--out-dir={out_dir}", "--rollout-prompts=4",
               "--group-size=2", "--max-new-tokens=4", "--eval-every=0", "--task-size=64", "--threads=1",
               "--max-steps=1", "--dynamic-sampling"])
    torch.save(calls, os.path.join(out_dir, f"calls{dist.rank()}.pt"))


def kl_reward_step(sharded):
    """--kl-in-reward with --adv-scale=batch on two groups of 4 of the 8 rows: this rank's group (both when not
    sharded), the policy and a different reference FSDP-sharded. -> {"adv": this rank's advantages, "kl": the mean
    per-token KL over every rank}."""
    c = grpo.GRPOConfig(**{**grpo.GRPOConfig().__dict__, **grpo.PRESETS["cpu"], "init_from": "x", "beta": 0.05,
                           "group_size": 4, "micro_batch_size": 2, "adv_scale": "batch", "kl_in_reward": True,
                           "kl_estimator": "k1"})
    policy, ref = tiny().eval(), tiny().eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.9)
    r, w = (dist.rank(), dist.world_size()) if sharded else (0, 1)
    if sharded:
        policy, ref = dist.shard_model(policy), dist.shard_model(ref)
    lo, hi = r * 8 // w, (r + 1) * 8 // w
    mine = rows()[lo:hi]
    b = rollout.make_batch(*([r[k] for r in mine] for k in ("prompt", "completion", "sampler_logp", "adv")),
                           scores=[[0.5 * (i % 3), 1.0, 0.0, float("nan")] for i in range(lo, hi)])
    kl = grpo.kl_reward(policy, ref, b, c, VOCAB)
    return {"adv": b.adv, "kl": kl}


def load(hf_dir, out_dir):
    """Sharded loading of a Hugging Face directory: each rank reads only its rows; records its local shards (with
    their row ranges) and the logits of a forward through the sharded model."""
    import safetensors
    real, numbers_read = safetensors.safe_open, [0]

    class Spy:  # counts the numbers actually read from the files, through get_tensor and slices alike
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.h = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.h.keys()

        def get_tensor(self, key):
            t = self.h.get_tensor(key)
            numbers_read[0] += t.numel()
            return t

        def get_slice(self, key):
            sl, spy = self.h.get_slice(key), self
            return type("Slice", (), {"get_shape": lambda _: sl.get_shape(),
                                      "__getitem__": lambda _, i: spy.count(sl[i])})()

        def count(self, t):
            numbers_read[0] += t.numel()
            return t
    safetensors.safe_open = Spy
    model = checkpoint.build_model(hf_dir, None, torch.device("cpu")).eval()
    safetensors.safe_open = real
    local = {k: (hf.local_rows(p), p.to_local().clone()) for k, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(torch.arange(24).view(2, 12) % 150)
    hf.save(model, os.path.join(out_dir, "exported"), max_shard_bytes=20_000)  # gathered tensor by tensor
    torch.save({"local": local, "logits": logits, "numbers_read": numbers_read[0],
                "tied": model.lm_head.weight is model.embed_tokens.weight},
               os.path.join(out_dir, f"load{dist.rank()}.pt"))


if __name__ == "__main__":
    if sys.argv[1] == "dynamic":
        dynamic(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "klreward":
        dist.init_distributed()
        torch.set_num_threads(1)
        torch.save(kl_reward_step(sharded=True), os.path.join(sys.argv[2], f"kl{dist.rank()}.pt"))
    elif sys.argv[1] == "load":
        dist.init_distributed()
        load(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[1])
