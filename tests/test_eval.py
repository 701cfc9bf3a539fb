import json
import math
from itertools import combinations

import numpy as np
import torch
import pytest

import data
import eval as ev
import rollout
import tasks
import toy


def brute_pass_at_k(n, c, k):
    """The probability that a random k-subset of n samples (c correct) holds a correct one, by enumeration."""
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(4, 1, 1), (4, 1, 2), (4, 1, 4), (5, 0, 3), (5, 5, 1), (6, 2, 3), (8, 3, 8),
                                   (7, 6, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges_and_closed_form():
    assert ev.pass_at_k(10, 0, 5) == 0.0        # c = 0
    assert ev.pass_at_k(10, 10, 1) == 1.0       # c = n
    assert ev.pass_at_k(10, 1, 10) == 1.0       # k = n with one correct
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert ev.pass_at_k(4, 1, 4) == 1.0         # verl's bootstrap gives 0.684 here (PITFALLS P18)
    # large n: the closed form with exact binomials, no overflow in our running product
    assert ev.pass_at_k(1000, 7, 100) == pytest.approx(1 - math.comb(993, 100) / math.comb(1000, 100), rel=1e-9)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)


def test_majority_vote_and_tie_rule():
    assert ev.majority_vote([]) is None
    assert ev.majority_vote([None, None]) is None
    assert ev.majority_vote(["3", "3", "4"]) == "3"
    assert ev.majority_vote(["3", None, None, None]) is None       # no answer is a vote too, and it won ...
    assert ev.majority_vote(["3", "3", None, None]) is None        # ... or tied
    assert ev.majority_vote(["3", "3", None, "4"]) == "3"
    assert ev.majority_vote(["3", "4"]) is None                    # a tie is not a majority ...
    assert ev.majority_vote(["4", "3", "3", "4", "5"]) is None     # ... whatever the order
    assert ev.majority_vote(["4", "3", "3", "4", "3"]) == "3"
    assert ev.vote(["4", "3", "3", "4", "3"]) == [1, 2, 4]


def test_equivalent_answers_vote_together():
    assert ev.majority_vote(["1,000", "1000.0", " 1000 ", "999", None]) == "1,000"
    # math-verify equivalence: three spellings of one half outvote two of a third
    assert ev.majority_vote(["1/2", "\\frac{1}{3}", "0.5", "\\frac12", "1/3"]) == "1/2"
    assert ev.majority_vote(["\\frac{1}{3}", "1/2", "0.5", "1/3"]) is None  # 2 - 2: a tie
    assert ev.majority_vote(["x = 5", "x=5", "5", "6"]) == "x = 5"
    # exact mode (the toy's reversed digits): "09" is ninety, never nine
    assert ev.vote(["09", "9", "9"], same=lambda a, b: a == b) == [1, 2]


def test_cons_counts_equivalent_answers_and_has_a_standard_error():
    """cons@k once split "1/2", "0.5" and "\\frac12" into three votes and dropped samples with no answer."""
    s = ev.summarize([inst("a", [1.0, 0.0, 1.0, 1.0], ["1/2", "1/3", "0.5", "\\frac12"]),
                      inst("b", [1.0, 0.0, 0.0, 0.0], ["7", None, None, None]),
                      inst("c", [0.0, 0.0, 1.0, 1.0], ["8", "8", "6", "6.0"]),
                      inst("d", [1.0, 1.0, 1.0, 0.0], ["2", "2", "2", "3"])], k=4)
    assert [i["cons"] for i in s["instances"]] == [1.0, 0.0, 0.0, 1.0]
    assert s["cons@4"] == 0.5 and s["cons@4_se"] == pytest.approx(np.std([1, 0, 0, 1], ddof=1) / 2)


def inst(prompt, accs, answers, fmt=1.0, difficulty=None, tokens=10):
    return {"prompt": prompt, "difficulty": difficulty, "samples": [
        {"text": f"<answer>{a}</answer> wait", "answer": a, "accuracy": x, "format": fmt, "reward": (x or 0) + fmt,
         "tokens": tokens, "truncated": False} for x, a in zip(accs, answers)]}


def test_summary_pass1_standard_error_cons_and_difficulty():
    insts = [inst("a", [1, 1, 0, 0], ["5", "5", "6", "7"], difficulty=3),   # p=0.5, vote 5 (right)
             inst("b", [0, 0, 0, 1], ["1", "1", "2", "9"], difficulty=3),   # p=0.25, vote 1 (wrong)
             inst("c", [1, 1, 1, 1], ["4", "4", "4", "4"], difficulty=4),   # p=1
             inst("d", [1, 0, 0, 0], ["8", "2", "3", None], difficulty=4)]  # p=0.25, no majority -> wrong
    s = ev.summarize(insts, 4)
    per = [0.5, 0.25, 1.0, 0.25]
    assert s["pass@1"] == pytest.approx(np.mean(per))
    assert s["pass@1_se"] == pytest.approx(np.std(per, ddof=1) / 2)
    assert s["cons@4"] == pytest.approx(0.5)
    assert s["pass@k"]["4"] == pytest.approx(1.0) and s["pass@k"]["1"] == pytest.approx(np.mean(per))
    assert s["by_difficulty"] == {"3": {"problems": 2, "pass@1": 0.375}, "4": {"problems": 2, "pass@1": 0.625}}
    assert s["reflective_per_token"] == pytest.approx(16 / 160)  # one "wait" per 10-token sample


def test_unparseable_gold_is_skipped_and_counted():
    s = ev.summarize([inst("a", [1, 0], ["1", "2"]), inst("b", [None, None], ["1", "2"])], 2)
    assert s["problems"] == 1 and s["skipped"] == 1 and s["pass@1"] == 0.5


def test_paired_bootstrap_on_a_constructed_case():
    a = np.zeros(200)
    b = np.r_[np.ones(100), np.zeros(100)]  # B solves half the problems A misses: true difference 0.5
    diff, (lo, hi), p = ev.paired_bootstrap(a, b, samples=4000, seed=0)
    assert diff == pytest.approx(0.5)
    assert lo < 0.5 < hi and lo > 0.4 and hi < 0.6 and p == 0.0
    diff, (lo, hi), p = ev.paired_bootstrap(b, b, samples=500)  # identical runs: exactly zero difference
    assert diff == 0 and lo == 0 and hi == 0
    with pytest.raises(ValueError):
        ev.paired_bootstrap([1, 2], [1])


def test_compare_reads_two_eval_dirs(tmp_path, capsys):
    for name, scores in (("A", [0, 0, 1, 0]), ("B", [1, 1, 1, 0])):
        d = tmp_path / name
        d.mkdir()
        with open(d / "instances.jsonl", "w") as f:
            for i, p in enumerate(scores):
                f.write(json.dumps({"prompt": f"q{i}", "pass@1": p}) + "\n")
    diff, ci = ev.main([f"--compare={tmp_path / 'A'},{tmp_path / 'B'}"])
    assert diff == pytest.approx(0.5)
    assert "4 shared problems" in capsys.readouterr().out


def test_rejection_sampling_keeps_only_correct_well_formed_samples():
    i = inst("p", [1, 1, 0, 1, 1], ["5", "5", "6", "5", "5"])
    i["samples"][3]["format"] = 0.0                    # right answer, broken format: dropped
    i["samples"][4]["text"] = "<answer>5</answer> v2"  # a distinct correct text
    rows = ev.rejection_sample([i], dedup=True)
    assert [r["completion"] for r in rows] == ["<answer>5</answer> wait", "<answer>5</answer> v2"]
    assert all(r["prompt"] == "p" for r in rows)
    assert len(ev.rejection_sample([i], dedup=False)) == 3
    assert len(ev.rejection_sample([i], max_per_prompt=1)) == 1
    unparse = inst("q", [None], ["1"])
    assert ev.rejection_sample([unparse]) == []
    mixed = inst("m", [1, 1], ["5", "5"])  # language measured (a bilingual problem): only single-language kept
    mixed["samples"][0]["language"], mixed["samples"][1]["language"] = 0.5, 1.0
    mixed["samples"][1]["text"] = "<answer>5</answer> pure"
    assert [r["completion"] for r in ev.rejection_sample([mixed])] == ["<answer>5</answer> pure"]
    s = ev.summarize([mixed], 2)
    assert s["language"] == 0.75 and "language" not in ev.summarize([inst("a", [1, 0], ["1", "2"])], 2)


def test_reflective_count_whole_words_case_insensitive():
    assert ev.reflective_count("Wait, but I should CHECK. Waiting is not checking; however: wrong") == 5


def test_evaluate_scores_each_prompt_against_its_own_gold(monkeypatch):
    """Plumbing: an oracle sampler answering each prompt's gold gets pass@1 = 1; a shifted one gets 0."""
    tok = toy.toy_tokenizer(n_docs=500)
    exs = toy.toy_problems(7, "heldout", seed=3)
    gold = {data.apply_template(data.TOY_TEMPLATE, e.prompt): e.answer for e in exs}
    order = list(gold)

    def oracle(shift):
        def gen(model, prompts, max_new_tokens, temperature, top_p, num_samples, **kw):
            texts = [order[(order.index(tok.decode(p)) + shift) % len(order)] for p in prompts]
            toks = [tok.encode(f"<think>x</think><answer>{gold[t]}</answer>") for t in texts for _ in range(num_samples)]
            return rollout.Rollout(tokens=toks, logprobs=[[0.0] * len(t) for t in toks],
                                   truncated=[False] * len(toks), num_samples=num_samples)
        return gen
    model = torch.nn.Linear(1, 1)
    model.config = __import__("types").SimpleNamespace(eos_token_id=None)
    monkeypatch.setattr(rollout, "generate", oracle(0))
    s = ev.evaluate(model, tok, exs, k=3, template=data.TOY_TEMPLATE, workers=0, batch_prompts=3)
    assert s["pass@1"] == 1.0 and s["cons@3"] == 1.0 and s["problems"] == 7
    assert [i["gold"] for i in s["instances"]] == [e.answer for e in exs]
    monkeypatch.setattr(rollout, "generate", oracle(1))
    assert ev.evaluate(model, tok, exs, k=2, template=data.TOY_TEMPLATE, workers=0)["pass@1"] < 0.3


def test_sampled_eval_does_not_depend_on_batching():
    """Each sample has its own random stream (seed, problem, sample): the same samples whether the problems are
    sampled 2 or 5 at a time (and so on any number of ranks); another seed gives other samples."""
    from model import ModelConfig, Transformer
    tok = toy.toy_tokenizer(n_docs=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64 * (tok.vocab_size // 64 + 1), hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                    v_head_dim=8, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                    num_experts_per_tok=2))
    exs = toy.toy_problems(5, "heldout", seed=1)
    run = lambda bp, seed=0: [[s["text"] for s in i["samples"]] for i in ev.evaluate(  # noqa: E731
        model, tok, exs, k=3, template=data.TOY_TEMPLATE, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=seed,
        workers=0, batch_prompts=bp)["instances"]]
    a = run(5)
    assert run(2) == a and run(1) == a
    assert run(5, seed=1) != a
    assert len({t for texts in a for t in texts}) > 5  # really sampled, not greedy


def test_toy_solution_roles_label_every_copy():
    text, roles, k = ev.toy_solution_roles("24+70+31")
    assert text == "<think>24+70+31: 24+70=94 94+31=26</think><answer>26</answer>" and k == 3
    assert len(roles) == len(text)
    role_of = lambda i, n=2: set(roles[i:i + n])  # noqa: E731
    h = len("<think>")
    assert role_of(h) == {"op0"} and role_of(h + 3) == {"op1"} and role_of(h + 6) == {"op2"}
    assert roles[h + 8] == "choice"  # ':' where a direct answer writes '='
    s = text.index(": ") + 2  # the steps: op0 restated, op1 copied, a sum; the carry restated, op2 copied, a sum
    assert [roles[s + i] for i in (0, 3, 6, 9, 12, 15)] == ["op0", "op1", "sum", "carry", "op2", "sum"]
    assert set(roles[text.index("<answer>") + 8:][:2]) == {"answer"}
    # an operand that repeats still gets its own label
    assert ev.toy_solution_roles("01+01+01+01")[0].count("01") == 8


class Oracle(torch.nn.Module):
    """A stand-in model that knows the correct stepwise solutions: at every position it puts logit 5 on the gold
    next token (0 elsewhere), except where `wrong(role)` says to put it on another digit instead."""

    def __init__(self, tok, exs, wrong=lambda role: False, vocab=320):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, vocab)
        self.seqs = []
        for e in exs:
            comp, roles, _ = ev.toy_solution_roles(e.prompt)
            p, c = tok.encode(data.apply_template(data.TOY_TEMPLATE, e.prompt)), tok.encode(comp)
            assert tok.decode(c) == comp
            ends = np.cumsum([len(tok.decode([t])) for t in c])
            self.seqs.append((p + c, [None] * (len(p) - 1) + [roles[e - 1] for e in ends]))
        self.wrong, self.zero, self.vocab = wrong, tok.encode("0")[0], vocab

    def forward(self, x):
        out = torch.zeros(*x.shape, self.vocab)
        for b, row in enumerate(x.tolist()):
            seq, roles = next((s, r) for s, r in self.seqs if row[:len(s)] == s)
            for t in range(len(seq) - 1):
                nxt = seq[t + 1]
                if roles[t] is not None and self.wrong(roles[t]):
                    nxt = self.zero + (nxt - self.zero + 1) % 10  # another digit
                out[b, t, nxt] = 5.0
        return out


def test_toy_probe_on_a_perfect_and_a_miscopying_model():
    tok = toy.toy_tokenizer(n_docs=500)
    exs = tasks.load_task("toy", n=12, split="dev", seed=4)
    perfect = ev.toy_probe(Oracle(tok, exs), tok, exs, data.TOY_TEMPLATE, batch=5)
    assert perfect["problems"] == 12 and all(perfect[key] == 1.0 for key in ("op0", "op1", "op2", "sum", "answer"))
    # logit 5 on the gold token, 0 on the tokenizer's other V - 1 ids (the padded head's extra rows do not count):
    # at T=0.6 each token has p = 1 / (1 + (V - 1) e^(-5/0.6)); the choice token is left out, at T=1 it is p_step
    V = tok.vocab_size
    n_tok = [len(tok.encode(ev.toy_solution_roles(e.prompt)[0])) - 1 for e in exs]
    want = np.mean([(1 / (1 + (V - 1) * math.exp(-5 / 0.6))) ** n for n in n_tok])
    assert perfect["step_ok"] == pytest.approx(want, rel=1e-4) and 0.005 < want < 0.5  # fp32 logits
    assert perfect["p_step"] == pytest.approx(1 / (1 + (V - 1) * math.exp(-5)), rel=1e-6)
    # a model that miscopies operand 2 whenever it restates it: op2 fails everywhere, nothing else does
    bad = ev.toy_probe(Oracle(tok, exs, wrong=lambda r: r == "op2"), tok, exs, data.TOY_TEMPLATE)
    assert bad["op2"] == 0.0 and bad["op1"] == 1.0 and bad["sum"] == 1.0 and bad["step_ok"] < 1e-6
    fours = [e for e in exs if e.meta["difficulty"] == 4]
    assert fours, "the draw should hold a 4-operand problem"
    only4 = ev.toy_probe(Oracle(tok, exs, wrong=lambda r: r == "op3"), tok, exs, data.TOY_TEMPLATE)
    assert only4["step_ok_3"] == perfect["step_ok_3"] and only4["step_ok_4"] < 1e-6 < perfect["step_ok_4"]
    assert only4["op3"] == 0.0  # averaged over the problems that have an operand 3


def test_sweep_table_reads_each_runs_outputs(tmp_path, capsys):
    def run(name, val, base, after, by, times):
        d = tmp_path / name
        for sub in ("base", "probe_base", "eval_base", "eval_rl"):
            (d / sub).mkdir(parents=True)
        (d / "base" / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "val_loss": v}) + "\n"
                                                          for i, v in enumerate([1.5, val])))
        (d / "probe_base" / "probe.json").write_text(json.dumps({"step_ok_3": 0.9, "step_ok_4": 0.8}))
        (d / "eval_base" / "summary.json").write_text(json.dumps({"pass@1": base, "pass@1_se": 0.01,
                                                                  "by_difficulty": {}}))
        (d / "eval_rl" / "summary.json").write_text(json.dumps({"pass@1": after, "pass@1_se": 0.02, "by_difficulty": {
            "3": {"pass@1": by[0]}, "4": {"pass@1": by[1]}}}))
        (d / "times.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in times))
        return str(d)
    # run 1 failed the probe at first and trained on (pretrain_more); an interrupted pretrain is timed twice
    a = run("1", 0.74, 0.2, 0.97, (0.99, 0.95), [("data", 9), ("pretrain", 400), ("pretrain", 20),
                                                  ("pretrain_more", 200), ("grpo", 130)])
    b = run("2", 0.81, 0.1, 0.60, (0.90, 0.30), [("data", 8)])
    (tmp_path / "3").mkdir()  # a run that died before anything was written
    lines = ev.sweep([a, b, str(tmp_path / "3")])
    assert lines[2] == ("| 1 | 1 | 0.740 | 0.900 / 0.800 | 0.200 | 0.970 ± 0.020 | +0.770 | 0.990 / 0.950 | "
                        "9 / 620 / 130 / 0 |")
    assert lines[3].startswith("| 2 | 1 | 0.810 |") and lines[4].startswith("| 3 | - | - | - / - | - | - ± - | - |")
    out = capsys.readouterr().out
    assert "worst: " + b + " at 0.600" in out and "2 of 3 runs finished RL, 0 stopped" in out
    # a run the pre-RL check stopped is the worst, whatever the others reached
    (tmp_path / "3" / "probe_base").mkdir()
    (tmp_path / "3" / "probe_base" / "probe.json").write_text(json.dumps({"step_ok_3": 0.3, "step_ok_4": 0.5,
                                                                          "passed": False}))
    ev.sweep([a, b, str(tmp_path / "3")])
    out = capsys.readouterr().out
    assert f"worst: {tmp_path / '3'} stopped before RL" in out and "1 stopped before it" in out
