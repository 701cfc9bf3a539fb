"""r1.py: the cold-start filters and rewrite, the general data and the mix (the data steps of train.sh r1)."""
import json

import pytest

import checkpoint
import r1
import rewards
import toy
from config import ConfigError


def _sample(text, accuracy=1.0, fmt=1.0, language=1.0, tokens=30):
    return {"text": text, "accuracy": accuracy, "format": fmt, "language": language, "tokens": tokens}


ZH = "<think>24+70+31: 24+70=94 然后 94+31=26</think><answer>26</answer>"
PROMPT = "User: 计算 24+70+31\nAssistant:"


def test_repeated_share():
    assert r1.repeated_share("a b c d e") == 0.0 and r1.repeated_share("a b") == 0.0
    assert r1.repeated_share("x y z x y z x y z") == pytest.approx(4 / 7)  # 7 trigrams, 3 distinct


def test_cold_start_filters_each_rule():
    inst = {"prompt": PROMPT, "text": "24+70+31", "lang": "zh", "samples": [
        _sample(ZH),                                       # kept
        _sample(ZH.replace("26</answer>", "27</answer>"), accuracy=0.0),  # wrong
        _sample("<think>x</think>", fmt=0.0),              # malformed
        _sample(ZH.replace("然后", "then"), language=0.5),  # mixed languages
        _sample(ZH, tokens=200),                            # too long
        _sample("<think>" + "24+70=94 wait, recheck: " * 6 + "</think><answer>26</answer>"),  # repetitive
        _sample(ZH)]}                                       # a duplicate of the first
    rows = r1.cold_start([inst], max_tokens=72, per_prompt=5, max_repeat=0.25)
    assert len(rows) == 1 and rows[0]["prompt"] == PROMPT
    assert rows[0]["completion"] == ("<think>24+70+31: 24+70=94 然后 94+31=26</think>"
                                     "<answer>26, 所以 \\boxed{26} = 24+70+31</answer>")
    two = dict(inst, samples=[_sample(ZH), _sample(ZH.replace("然后 ", "然后  "))])
    assert len(r1.cold_start([two], 72, per_prompt=1, max_repeat=0.25)) == 1
    with pytest.raises(ConfigError, match="toy:en,zh"):
        r1.cold_start([{"prompt": PROMPT, "samples": []}], 72, 1, 0.25)


def test_rewritten_sample_keeps_its_rewards():
    """The readable format still scores: format 1, the boxed answer in the answer block is the answer, and the
    reasoning's language is untouched."""
    from data import Example
    new = r1.rewrite(ZH, "24+70+31", "zh")
    ex = Example("计算 24+70+31", "26", "math", {"notation": "reversed", "lang": "zh"})
    total, comps, _ = rewards.score_batch([new], [ex], {"accuracy": 1.0, "format": 1.0, "language": 1.0}, workers=0,
                                          answer_block=True)
    assert comps == {"accuracy": [1.0], "format": [1.0], "language": [1.0]} and total == [3.0]
    en = r1.rewrite("<think>a then b</think><answer>09</answer>", "24+70", "en")
    assert en.endswith("<answer>09, so \\boxed{09} = 24+70</answer>")


def test_main_steps_write_what_sft_reads(tmp_path, capsys):
    samples = tmp_path / "zero"
    samples.mkdir()
    inst = {"prompt": PROMPT, "text": "24+70+31", "lang": "zh", "samples": [_sample(ZH)]}
    checkpoint.atomic_write_jsonl(str(samples / "instances.jsonl"), [inst])
    r1.main(["--step=cold_start", f"--samples={samples}", f"--out={tmp_path / 'cold.jsonl'}"])
    cold = [json.loads(x) for x in open(tmp_path / "cold.jsonl")]
    assert len(cold) == 1 and "\\boxed{26}" in cold[0]["completion"]
    r1.main(["--step=general", f"--out={tmp_path / 'gen'}", "--pairs=50", "--general-rows=40"])
    for kind in ("helpful", "harmless"):
        pairs = [json.loads(x) for x in open(tmp_path / "gen" / f"pairs_{kind}.jsonl")]
        assert len(pairs) == 50 and all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    gen = [json.loads(x) for x in open(tmp_path / "gen" / "sft.jsonl")]
    assert len(gen) == 40 and all(g["prompt"].startswith("User: ") and g["prompt"].endswith("\nAssistant:")
                                  for g in gen)
    styles = {(toy.hidden_helpful(g["completion"]) == 1.0, toy.hidden_harmless(g["completion"])) for g in gen}
    assert len(styles) >= 3  # careless: polite and concise, rude, rambling all occur
    r1.main(["--step=mix", f"--samples={tmp_path / 'cold.jsonl'}", f"--general={tmp_path / 'gen' / 'sft.jsonl'}",
             f"--out={tmp_path / 'mix.jsonl'}"])
    mix = [json.loads(x) for x in open(tmp_path / "mix.jsonl")]
    assert sorted(map(json.dumps, mix)) == sorted(map(json.dumps, cold + gen)) and mix != cold + gen  # shuffled
    with pytest.raises(ConfigError, match="--samples"):
        r1.main(["--step=cold_start", f"--samples={tmp_path / 'nope'}", f"--out={tmp_path / 'x.jsonl'}"])
    bad = tmp_path / "bad"
    bad.mkdir()
    checkpoint.atomic_write_jsonl(str(bad / "instances.jsonl"), [dict(inst, samples=[_sample(ZH, accuracy=0.0)])])
    with pytest.raises(ConfigError, match="no sample"):
        r1.main(["--step=cold_start", f"--samples={bad}", f"--out={tmp_path / 'x.jsonl'}"])


def test_judge_scores_replies_by_the_hidden_rule(monkeypatch, tmp_path, capsys):
    import eval as ev
    import rollout
    exs = toy.general_prompts("heldout")[:2]
    replies = [toy.general_reply(exs[0]), toy.general_reply(exs[0], polite=False),
               toy.general_reply(exs[1], ramble=2), "no format at all"]
    seen = {}

    def fake_generate(model, prompts, max_new_tokens, temperature, top_p, num_samples, **kw):
        seen.update(prompts=prompts, k=num_samples, t=temperature)
        return rollout.Rollout(tokens=[[1] * (i + 1) for i in range(4)], logprobs=[[]] * 4, truncated=[False] * 4,
                               num_samples=num_samples)
    monkeypatch.setattr(rollout, "generate", fake_generate)
    monkeypatch.setattr(rollout, "completion_texts", lambda tok, out, stop: replies)
    monkeypatch.setattr(rollout, "stop_ids_for", lambda model, tok: [0])

    class Tok:
        vocab_size = 10
        decode = staticmethod(lambda ids: "")
        encode_text = staticmethod(lambda text: [1] * len(text))
    res = r1.judge(None, Tok(), exs, 2, 72, 0)
    assert seen["k"] == 2 and seen["t"] == 0.6 and len(seen["prompts"]) == 2
    assert res["hidden_helpful"] == pytest.approx((1.0 + 0.5 + toy.hidden_helpful(replies[2]) + 0.0) / 4)
    assert res["hidden_harmless"] == pytest.approx(3 / 4) and res["format_rate"] == pytest.approx(3 / 4)
    assert res["mean_length"] == pytest.approx(2.5)
    for name, general in (("a", None), ("b", res)):  # eval.py --report shows it beside pass@1 when present
        d = tmp_path / name
        d.mkdir()
        checkpoint.atomic_write_json(str(d / "summary.json"), {"problems": 1, "k": 1, "pass@1": 1.0,
                                                              "pass@1_se": 0.0, "cons@1": 1.0, "pass@k": {"1": 1.0},
                                                              "format_rate": 1.0, "mean_length": 3.0,
                                                              "reflective_per_token": 0.0, "by_difficulty": {}})
        if general:
            checkpoint.atomic_write_json(str(d / "general.json"), general)
    ev.report([str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert f"| general prompts: hidden harmless | - | {0.75:.3f} |" in out


def test_hacking_curve_reads_the_general_steps(tmp_path, capsys):
    rows = [{"step": 1, "accuracy": 0.5}] + [
        {"step": s, "accuracy": 0.9, "general_outputs": 8, "rm_helpful": 0.1 * s, "rm_harmless": 1.0,
         "hidden_helpful": 1 - 0.1 * s, "hidden_harmless": 1.0} for s in (2, 3)]
    checkpoint.atomic_write_jsonl(str(tmp_path / "m.jsonl"), rows)
    r1.main(["--step=hacking", f"--metrics={tmp_path / 'm.jsonl'}", f"--out={tmp_path / 'h.png'}"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "rm_helpful", "rm_harmless", "hidden_helpful", "hidden_harmless", "accuracy"]
    assert [line.split()[0] for line in out[1:3]] == ["2", "3"] and float(out[2].split()[3]) == pytest.approx(0.7)
    assert "first 1 -> last 1 of these steps (means): rm_helpful 0.200 -> 0.300" in out[3]
    assert "hidden_helpful 0.800 -> 0.700" in out[3]
    assert (tmp_path / "h.png").stat().st_size > 1000
    checkpoint.atomic_write_jsonl(str(tmp_path / "n.jsonl"), rows[:1])
    with pytest.raises(ConfigError, match="no step with general prompts"):
        r1.main(["--step=hacking", f"--metrics={tmp_path / 'n.jsonl'}", f"--out={tmp_path / 'h.png'}"])
