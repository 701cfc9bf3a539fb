"""Sampling tokens/s: rollout.generate against transformers' generate() on the same weights, and against our own
cache-free loop (a full forward over the whole sequence for every new token).

    python bench/rollout.py [--rows=64] [--new=128] [--threads=2]

The model is a tiny DeepSeek-V3-style MoE (the CPU default's shape), exported with hf.save and loaded by
transformers as DeepseekV3ForCausalLM. Same prompts (8 prompts x 8 samples = 64 rows, 32 prompt tokens each),
temperature 1, no stop tokens (every row makes exactly `new` tokens), fp32 on CPU. Run it alone.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import hf  # noqa: E402
import rollout  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


@torch.no_grad()
def cache_free(model, prompts, new, G, gen):
    seq = torch.tensor(prompts).repeat_interleave(G, 0)  # (R, Tp)
    for _ in range(new):
        logits = model(seq)[:, -1].float()  # the whole sequence again, every step
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        seq = torch.cat([seq, nxt], 1)
    return seq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    G = 8
    P = a.rows // G
    cfg = ModelConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=4, n_routed_experts=8, n_group=2,
                      topk_group=1, num_experts_per_tok=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    prompts = torch.randint(0, cfg.vocab_size, (P, a.prompt_len)).tolist()
    with tempfile.TemporaryDirectory() as d:
        hf.save(ours, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
    total = a.rows * a.new

    rollout.generate(ours, prompts[:1], max_new_tokens=4, num_samples=2)  # warm-up
    t = time.perf_counter()
    out = rollout.generate(ours, prompts, max_new_tokens=a.new, temperature=1.0, num_samples=G, seed=0)
    t_ours = time.perf_counter() - t
    assert out.new_tokens == total

    ids = torch.tensor(prompts)
    with torch.no_grad():
        theirs.generate(ids[:1], max_new_tokens=4, do_sample=True)  # warm-up
        t = time.perf_counter()
        res = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                          top_p=1.0, max_new_tokens=a.new, min_new_tokens=a.new, num_return_sequences=G,
                          eos_token_id=None, pad_token_id=0)
        t_hf = time.perf_counter() - t
    assert res.shape == (a.rows, a.prompt_len + a.new)

    t = time.perf_counter()
    cache_free(ours, prompts, a.new, G, torch.Generator().manual_seed(0))
    t_free = time.perf_counter() - t

    print(f"sampling {a.rows} rows x {a.new} new tokens ({P} prompts x {G}), prompt {a.prompt_len} tokens, "
          f"{ours.num_params() / 1e6:.2f}M-param MoE, fp32 CPU, {a.threads} threads")
    print(f"  nano-r1 rollout.generate       {total / t_ours:8.0f} tok/s")
    print(f"  transformers generate()        {total / t_hf:8.0f} tok/s   ratio ours/theirs = {t_hf / t_ours:.2f}x")
    print(f"  nano-r1 cache-free loop        {total / t_free:8.0f} tok/s   ratio ours/cache-free = "
          f"{t_free / t_ours:.2f}x")


if __name__ == "__main__":
    main()
