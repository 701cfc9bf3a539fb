import pytest
import torch

import rollout
from model import ModelConfig, Transformer

V = 203


def make(kind="mla", seed=0, vocab=V):
    if kind == "gqa":
        cfg = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=vocab, kv_lora_rank=None,
                          num_key_value_heads=2, qk_norm=True, n_shared_experts=0, scoring_func="softmax",
                          n_routed_experts=4, num_hidden_layers=2)
    else:
        cfg = ModelConfig(vocab_size=vocab, num_hidden_layers=2, n_group=2, topk_group=1)
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy paths are not decided by noise
        m.lm_head.weight.mul_(30)
    return m


PROMPTS = [[5, 17, 42, 9, 100], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_greedy_cached_equals_stepwise_full_argmax(kind):
    m = make(kind)
    out = rollout.generate(m, PROMPTS, max_new_tokens=10, temperature=0)
    for p, toks in zip(PROMPTS, out.tokens):
        seq = list(p)
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert toks == seq[len(p):]
    assert out.truncated == [True] * 3 and out.new_tokens == 30


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_sampler_logprobs_equal_full_forward_log_softmax(temperature):
    m = make()
    out = rollout.generate(m, PROMPTS, max_new_tokens=12, temperature=temperature, num_samples=2, seed=3)
    for i, (toks, lps) in enumerate(zip(out.tokens, out.logprobs)):
        p = PROMPTS[i // 2]
        seq = torch.tensor([p + toks])
        with torch.no_grad():
            logits = m(seq)[0].float() / temperature  # (T, V)
        # logits at position t predict token t+1 (PITFALLS P1)
        ref = torch.log_softmax(logits[len(p) - 1:-1], -1).gather(1, torch.tensor(toks)[:, None]).squeeze(1)
        assert (torch.tensor(lps) - ref).abs().max() < 1e-4


def test_rows_of_a_group_differ_at_high_temperature_and_seeds_reproduce():
    m = make()
    a = rollout.generate(m, [PROMPTS[0]], max_new_tokens=8, temperature=2.0, num_samples=4, seed=1)
    b = rollout.generate(m, [PROMPTS[0]], max_new_tokens=8, temperature=2.0, num_samples=4, seed=1)
    c = rollout.generate(m, [PROMPTS[0]], max_new_tokens=8, temperature=2.0, num_samples=4, seed=2)
    assert len({tuple(t) for t in a.tokens}) == 4  # every row sampled its own first token onwards
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    g = torch.Generator().manual_seed(1)
    assert rollout.generate(m, [PROMPTS[0]], max_new_tokens=8, temperature=2.0, num_samples=4,
                            generator=g).tokens == a.tokens


def test_stop_ids_several_and_at_the_last_allowed_position():
    m = make()
    free = rollout.generate(m, [PROMPTS[0]], max_new_tokens=12, temperature=0).tokens[0]
    k = next(i for i in range(3, 12) if free[i] not in free[:i])  # a token making its first appearance at step k
    # stop exactly at the last allowed position: terminated, not truncated, stop token kept
    out = rollout.generate(m, [PROMPTS[0]], max_new_tokens=k + 1, temperature=0, stop_ids=[free[k]])
    assert out.tokens[0] == free[:k + 1] and out.truncated == [False] and out.stop_reason == ["stop_id"]
    # one position short: truncated
    out = rollout.generate(m, [PROMPTS[0]], max_new_tokens=k, temperature=0, stop_ids=[free[k]])
    assert out.tokens[0] == free[:k] and out.truncated == [True] and out.stop_reason == ["length"]
    # several stop ids: whichever is sampled first ends the row, nothing after it is kept
    j = next(i for i in range(1, k) if free[i] not in free[:i])  # another first appearance, before k
    out = rollout.generate(m, [PROMPTS[0]], max_new_tokens=12, temperature=0, stop_ids=[V - 1, free[k], free[j]])
    assert out.tokens[0] == free[:j + 1] and out.truncated == [False]
    out = rollout.generate(m, [PROMPTS[0]], max_new_tokens=12, temperature=0, stop_ids=[free[k], V - 1])
    assert out.tokens[0] == free[:k + 1]  # the list's order does not matter, the sampling order does


def test_stop_strings():
    m = make()
    decode = lambda ids: "".join(chr(65 + i % 26) for i in ids)  # noqa: E731 one letter per id
    free = rollout.generate(m, [PROMPTS[1]], max_new_tokens=12, temperature=0).tokens[0]
    text = decode(free)
    j = next(j for j in range(4, 12) if text[j - 2:j + 1] not in text[:j])  # a 3-letter string first ending at j
    out = rollout.generate(m, [PROMPTS[1]], max_new_tokens=12, temperature=0, stop_strings=[text[j - 2:j + 1]],
                           decode=decode)
    assert out.tokens[0] == free[:j + 1] and out.stop_reason == ["stop_string"] and not out.truncated[0]
    with pytest.raises(ValueError, match="decode"):
        rollout.generate(m, [PROMPTS[1]], max_new_tokens=3, stop_strings=["x"])


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_ragged_batch_equals_each_prompt_alone(kind):
    m = make(kind)
    together = rollout.generate(m, PROMPTS, max_new_tokens=8, temperature=0, num_samples=2)
    for i, p in enumerate(PROMPTS):
        alone = rollout.generate(m, [p], max_new_tokens=8, temperature=0, num_samples=1)
        for g in range(2):
            assert together.tokens[2 * i + g] == alone.tokens[0]
            assert max(abs(a - b) for a, b in zip(together.logprobs[2 * i + g], alone.logprobs[0])) < 1e-4


def test_compaction_does_not_change_results():
    m = make()
    stop = rollout.generate(m, PROMPTS, max_new_tokens=10, temperature=0).tokens[1][2]
    kw = dict(max_new_tokens=10, temperature=0, num_samples=2, stop_ids=[stop])
    eager = rollout.generate(m, PROMPTS, compact_fraction=0.0, record_experts=True, **kw)
    never = rollout.generate(m, PROMPTS, compact_fraction=2.0, record_experts=True, **kw)
    assert eager.tokens == never.tokens and eager.truncated == never.truncated
    assert any(not t for t in eager.truncated) and any(eager.truncated)
    for a, b in zip(eager.logprobs, never.logprobs):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert all(torch.equal(x, y) for ea, ne in zip(eager.experts, never.experts) for x, y in zip(ea, ne))


def test_ids_beyond_the_tokenizer_vocab_are_never_sampled():
    m = make(vocab=256)  # a padded LM head: ids 200..255 are not real tokens
    with torch.no_grad():
        m.lm_head.weight[200:] = m.lm_head.weight[:56] * 5  # make the padding rows the likeliest
    out = rollout.generate(m, PROMPTS, max_new_tokens=40, temperature=3.0, num_samples=8, vocab_size=200, seed=0)
    assert max(max(t) for t in out.tokens) < 200
    unrestricted = rollout.generate(m, PROMPTS, max_new_tokens=40, temperature=3.0, num_samples=8, seed=0)
    assert max(max(t) for t in unrestricted.tokens) >= 200  # the test would catch a missing mask


def test_top_k_and_top_p():
    m = make()
    greedy = rollout.generate(m, PROMPTS, max_new_tokens=8, temperature=0)
    k1 = rollout.generate(m, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=5)
    p0 = rollout.generate(m, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=5)
    assert k1.tokens == greedy.tokens == p0.tokens
    # top_k=5: every sampled token is among the 5 likeliest at its step
    out = rollout.generate(m, [PROMPTS[0]], max_new_tokens=8, temperature=5.0, top_k=5, num_samples=4, seed=0)
    for toks in out.tokens:
        with torch.no_grad():
            logits = m(torch.tensor([PROMPTS[0] + toks]))[0, len(PROMPTS[0]) - 1:-1]
        top5 = logits.topk(5, -1).indices
        assert all(t in top5[i].tolist() for i, t in enumerate(toks))
    # top_p: sampled tokens lie in the smallest set holding p of the mass
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    ids, _ = rollout.sample_next(logits, 1.0, 0.5, 0, torch.Generator().manual_seed(0))
    probs = logits.softmax(-1)
    for r in range(64):
        ranked = probs[r].sort(descending=True)
        mass_before = ranked.values.cumsum(0) - ranked.values
        allowed = ranked.indices[mass_before < 0.5].tolist()
        assert ids[r].item() in allowed


def test_recorded_experts_match_the_training_forward():
    m = make()
    out = rollout.generate(m, PROMPTS, max_new_tokens=6, temperature=1.0, num_samples=2, record_experts=True)
    for i, toks in enumerate(out.tokens):
        seq = PROMPTS[i // 2] + toks
        with torch.no_grad():
            m(torch.tensor([seq[:-1]]))
        assert out.experts[i].shape == (len(seq) - 1, len(m.moe_layers()), m.config.num_experts_per_tok)
        assert torch.equal(out.experts[i], m.moe_routes()[0]), i


def test_prompt_batches_bound_the_cache_without_changing_greedy_results(monkeypatch):
    """prompt_batch=2 samples 3 prompts as 2 + 1: greedy rows equal the all-at-once rows, sampled runs reproduce
    from the seed, and the recorded experts line up with the rows."""
    m = make()
    rows = []
    real_cache = rollout.KVCache
    monkeypatch.setattr(rollout, "KVCache", lambda cfg, r, *a, **kw: rows.append(r) or real_cache(cfg, r, *a, **kw))
    whole = rollout.generate(m, PROMPTS, max_new_tokens=8, temperature=0, num_samples=2)
    assert rows == [3]  # one cache for all 3 prompts (their G rows are made from it by replication)
    parts = rollout.generate(m, PROMPTS, max_new_tokens=8, temperature=0, num_samples=2, prompt_batch=2)
    assert rows[1:] == [2, 1]  # then one cache per batch of at most 2 prompts
    assert parts.tokens == whole.tokens and parts.truncated == whole.truncated
    assert torch.allclose(torch.tensor(parts.logprobs), torch.tensor(whole.logprobs), atol=1e-5)
    a, b = (rollout.generate(m, PROMPTS, max_new_tokens=8, temperature=1.0, num_samples=2, seed=5, prompt_batch=2,
                             record_experts=True) for _ in range(2))
    assert a.tokens == b.tokens and len(a.tokens) == 6 and a.new_tokens == sum(map(len, a.tokens))
    for i, toks in enumerate(a.tokens):  # row i still belongs to prompt i // G after the concatenation
        assert a.experts[i].shape[0] == len(PROMPTS[i // 2]) + len(toks) - 1
    # per-row streams: sampled rows do not depend on which prompts share their batch (nor on compaction)
    seeds = list(range(100, 106))
    ref = rollout.generate(m, PROMPTS, max_new_tokens=8, temperature=1.5, num_samples=2, row_seeds=seeds,
                           stop_ids=[3, 7, 11], compact_fraction=0.1)
    for pb in (1, 2):
        got = rollout.generate(m, PROMPTS, max_new_tokens=8, temperature=1.5, num_samples=2, row_seeds=seeds,
                               stop_ids=[3, 7, 11], compact_fraction=0.1, prompt_batch=pb)
        assert got.tokens == ref.tokens
    # a row's stream, drawn 256 steps ahead, is exactly the stream a lone row draws step by step (past step 256)
    one = rollout.generate(m, [PROMPTS[1]], max_new_tokens=300, temperature=1.5, row_seeds=[42])
    assert one.tokens == rollout.generate(m, [PROMPTS[1]], max_new_tokens=300, temperature=1.5, seed=42).tokens
    assert len(one.tokens[0]) == 300
    with pytest.raises(ValueError, match="6 rows"):
        rollout.generate(m, PROMPTS, max_new_tokens=2, num_samples=2, row_seeds=[1, 2])
    dense = Transformer(ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=V, kv_lora_rank=None,
                                    num_key_value_heads=2, qk_norm=True, n_routed_experts=0, n_shared_experts=0,
                                    num_hidden_layers=1))
    assert rollout.generate(dense, PROMPTS, max_new_tokens=3, num_samples=2, record_experts=True,
                            prompt_batch=2).experts is None  # a dense model records nothing, in batches too


def test_bad_arguments():
    m = make()
    with pytest.raises(ValueError, match="at least one token"):
        rollout.generate(m, [[]], max_new_tokens=3)
    with pytest.raises(ValueError, match=r"prompt ids must be in \[0, 203\)"):
        rollout.generate(m, [[V]], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rollout.generate(m, [[1]], max_new_tokens=0)


def test_bf16_model_sampler_logprobs_use_fp32_logits():
    """PITFALLS M8 on the sampler side: with bf16 weights, the sampler's log-prob of each token is the fp32
    log-softmax of the bf16 hidden state times the bf16 head (what the trainer's kernel computes), not of logits
    rounded to bf16 (errors ~1e-3 at these logit sizes). The hidden states the sampler saw are captured at the
    final norm; no compaction, one prompt, so decode step s is row b's token s + 1."""
    m = make(vocab=256).to(torch.bfloat16)
    seen = []
    m.norm.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    G, T, n = 4, 0.8, 6
    out = rollout.generate(m, [PROMPTS[0]], max_new_tokens=n, temperature=T, num_samples=G, seed=5,
                           vocab_size=V, compact_fraction=2.0)
    w = m.lm_head.weight.double()  # (256, D): bf16 values, exact in float64
    hs = [seen[0][0, len(PROMPTS[0]) - 1].expand(G, -1)] + [s[:, 0] for s in seen[1:]]  # n x (G, D)
    worst_ours, worst_rounded = 0.0, 0.0
    for s in range(n):
        z = hs[s].double() @ w.T  # (G, 256)
        tgt = torch.tensor([out.tokens[b][s] for b in range(G)])[:, None]
        assert int(tgt.max()) < V  # padded head rows never sampled
        ref = torch.log_softmax(z[:, :V] / T, -1).gather(1, tgt).squeeze(1)
        rounded = torch.log_softmax(z[:, :V].bfloat16().double() / T, -1).gather(1, tgt).squeeze(1)
        ours = torch.tensor([out.logprobs[b][s] for b in range(G)], dtype=torch.float64)
        worst_ours = max(worst_ours, (ours - ref).abs().max().item())
        worst_rounded = max(worst_rounded, (rounded - ref).abs().max().item())
    assert worst_ours < 2e-5
    assert worst_rounded > 20 * worst_ours  # the check can tell fp32 logits from bf16-rounded ones


def test_stop_ids_for_takes_every_eos_id_inside_the_vocabulary():
    """PITFALLS P4: Qwen3 names two EOS ids; ids the tokenizer does not have are left out, the tokenizer's end of
    text is always in."""
    from types import SimpleNamespace
    m = make()
    tok = SimpleNamespace(eot_id=7, vocab_size=200)
    m.config.eos_token_id = [150, 9, 250]
    assert rollout.stop_ids_for(m, tok) == [7, 9, 150]
    m.config.eos_token_id = 12
    assert rollout.stop_ids_for(m, tok) == [7, 12]
    m.config.eos_token_id = None
    assert rollout.stop_ids_for(m, tok) == [7]


def test_generate_records_no_autograd_graph():
    """Sampling under grad mode (as grpo.py calls it) must not build a graph: the final hidden states of every
    forward it runs do not require grad, and the model's parameters still require grad afterwards."""
    m = make()
    assert torch.is_grad_enabled()
    seen = []
    m.norm.register_forward_hook(lambda mod, inp, out: seen.append(out.requires_grad))
    out = rollout.generate(m, PROMPTS, max_new_tokens=4, temperature=1.0, num_samples=2, seed=0)
    assert len(out.tokens) == 6 and seen and not any(seen)
    assert all(p.requires_grad for p in m.parameters())
