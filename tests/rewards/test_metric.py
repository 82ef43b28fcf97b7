"""The evaluate metric scores with exactly the same rules as training."""

from __future__ import annotations

import math

from trl_safeppo.rewards import resolve
from trl_safeppo.rewards.metric import load_reward_metric


def test_metric_matches_the_checker():
    spec = [{"name": "format", "weight": 0.5}, {"name": "math"}]
    predictions = ["<think>3+4</think><answer>7</answer>", "<answer>8</answer>", "<answer>5</answer>"]
    references = ["7", "7", "not math"]
    result = load_reward_metric(spec).compute(predictions=predictions, references=references)
    totals = resolve(spec)(completions=predictions, answer=references)
    # totals: 1.5; 0.5*0.25 + 0 = 0.125; third: math None -> format only 0.125
    assert totals == [1.5, 0.125, 0.125]
    assert math.isclose(result["mean_total"], (1.5 + 0.125 + 0.125) / 3)
    assert result["pass_rate"] == 1 / 3 and result["none_rate"] == 0.0 and result["n"] == 3
    assert result["math/mean"] == 0.5  # (1 + 0) / 2, the None left out


def test_metric_extra_columns():
    metric = load_reward_metric({"name": "refusal"}, reference_column="reference")
    result = metric.compute(predictions=["I'm sorry, but I can't help with that.", "Sure."], references=["", ""],
                            unsafe=[True, True])
    assert result["refusal/mean"] == 0.5
