"""Held-out evaluation (trl_safeppo/monitoring/evaluation.py)."""

from __future__ import annotations

import pytest

from trl_safeppo.monitoring.evaluation import evaluate_heldout, score_completions
from trl_safeppo.rewards import resolve


def _conv(text):
    return [{"role": "assistant", "content": text}]


def test_scores_use_the_checkers_correctness_and_format_rules():
    checker = resolve([{"name": "format", "weight": 0.5}, {"name": "math"}])
    completions = [
        "<think>3 + 4 = 7</think><answer>7</answer>",  # right answer, right format
        "<think>3 + 4 = 8</think><answer>8</answer>",  # wrong answer, right format
        "<answer>7</answer>",  # right answer, format misses the think block
        "The answer is 9.",  # wrong answer, no tags
    ]
    prompts = ["What is 3 + 4?"] * 4
    result = score_completions(prompts, [_conv(c) for c in completions], {"answer": ["7"] * 4}, checker)
    assert result["accuracy_rule"] == "math"
    assert result["accuracy"] == pytest.approx(2 / 4)  # completions 1 and 3
    assert result["format_pass_rate"] == pytest.approx(2 / 4)  # completions 1 and 2
    assert result["pass_rate"] == pytest.approx(1 / 4)  # only completion 1 has full marks on both rules
    # totals 0.5*format + math: 1.5, 0.5, 0.5*0.25 + 1 = 1.125 (two of four tags), 0 -> mean 3.125 / 4
    assert result["reward_mean"] == pytest.approx(3.125 / 4)


def test_strict_accuracy_checker_requires_the_format_and_reports_the_answer_accuracy_beside_it():
    # The demo's held-out accuracy (recipes/demo.yaml `eval.accuracy_reward`): a checker whose format rule, weight 0,
    # gates the total to 0 unless the format has full marks, then the math rule scores the answer.
    checker = resolve([{"name": "format", "weight": 0.5}, {"name": "math"}])
    strict = {"name": "strict", "rules": [{"name": "format", "weight": 0.0, "gate": {"below": 1.0}}, {"name": "math"}]}
    completions = [
        "<think>3 + 4 = 7</think><answer>7</answer>",  # right answer, right format: strict
        "<think>3 + 4 = 8</think><answer>8</answer>",  # wrong answer, right format
        "The answer is 7.",  # right answer in plain text: math credits it, strict does not
        "<answer>7</answer>",  # right answer, format misses the think block (format 0.25 < 1): not strict
    ]
    result = score_completions(["What is 3 + 4?"] * 4, [_conv(c) for c in completions], {"answer": ["7"] * 4},
                               checker, accuracy_reward=strict)
    assert result["accuracy_rule"] == "strict"
    assert result["accuracy"] == pytest.approx(1 / 4)  # completion 1 only
    assert result["answer_accuracy_rule"] == "math"
    assert result["answer_accuracy"] == pytest.approx(3 / 4)  # completions 1, 3 and 4
    assert result["format_pass_rate"] == pytest.approx(2 / 4)  # completions 1 and 2
    # the answer-only figure is left out where it would repeat `accuracy`
    plain = score_completions(["p"], [_conv("<answer>7</answer>")], {"answer": ["7"]}, checker, accuracy_reward="math")
    assert plain["accuracy"] == 1.0 and "answer_accuracy" not in plain


def test_explicit_rules_override_the_checker():
    def even_length(prompts, completions, **kwargs):
        return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]

    result = score_completions(["p"] * 3, ["ab", "abc", "abcd"], {}, accuracy_reward=even_length,
                               format_reward=even_length)
    assert result["accuracy"] == pytest.approx(2 / 3) and result["format_pass_rate"] == pytest.approx(2 / 3)
    assert result["accuracy_rule"] == "even_length" and "reward_mean" not in result


def test_a_checker_without_correctness_rule_counts_full_passes():
    result = score_completions(["p"] * 2, ["<think>a</think><answer>b</answer>", "b"], {}, resolve("format"))
    assert result["accuracy_rule"] == "format" and result["accuracy"] == pytest.approx(1 / 2)


def test_evaluate_heldout_generates_greedily_and_passes_dataset_columns(tiny_debug_path):
    from trl_safeppo.tasks.arithmetic import load_arithmetic

    data = load_arithmetic("eval", n=3).to_list()
    for row, label in zip(data, ["yes", "no", "yes"]):
        row["label"] = label

    def labelled_yes(prompts, completions, label, **kwargs):
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)  # conversational
        return [1.0 if lab == "yes" else 0.0 for lab in label]

    result = evaluate_heldout(tiny_debug_path, data, labelled_yes, max_new_tokens=5, batch_size=2, num_samples=1)
    assert result["n"] == 3 and result["accuracy"] == pytest.approx(2 / 3)
    assert 1 <= result["mean_length"] <= 5 and 0 <= result["truncation_rate"] <= 1
    if result["truncation_rate"] == 1:
        assert result["mean_length"] == 5  # every completion ran to max_new_tokens
    assert result["samples"][0]["prompt"] == data[0]["prompt"][-1]["content"]
    assert evaluate_heldout(tiny_debug_path, data, labelled_yes, max_new_tokens=5, n=2)["n"] == 2


def test_evaluate_heldout_bad_input():
    with pytest.raises(ValueError, match="the held-out dataset is empty"):
        evaluate_heldout("tiny://debug", [], resolve("math"))
    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        evaluate_heldout("tiny://debug", [{"question": "q"}], resolve("math"))
    with pytest.raises(ValueError, match="pass reward="):
        evaluate_heldout("tiny://debug", [{"prompt": "q"}])
