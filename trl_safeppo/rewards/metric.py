"""The rule checker as an ``evaluate`` metric, built locally (no Hub download), so held-out evaluation scores with
exactly the rules used in training.

```python
>>> from trl_safeppo.rewards.metric import load_reward_metric
>>> metric = load_reward_metric([{"name": "format", "weight": 0.5}, {"name": "math"}])
>>> result = metric.compute(predictions=["<think>3+4</think><answer>7</answer>", "<answer>8</answer>"],
...                         references=["7", "7"])
>>> result["mean_total"], result["pass_rate"], result["math/mean"]
(0.8125, 0.5, 0.5)

```
(0.8125 = (1.5 + 0.125) / 2: the second prediction gets format 0.5 * 2 / 4 = 0.25, weighted 0.5.)
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from .spec import resolve

_DESCRIPTION = "Rule-based reward (trl_safeppo.rewards): mean total, pass rate and per-rule means."


class RewardRulesMetric(evaluate.Metric):
    """``compute(predictions, references, **columns)``: predictions are completion texts, references fill the gold
    column (``reference_column``, default ``answer``); other dataset columns the rules need (``tests``, ``unsafe``,
    ...) are passed as extra keyword lists. Returns ``mean_total`` (over judged rows), ``pass_rate`` (over all rows),
    ``none_rate``, ``<rule>/mean`` and ``n``."""

    def __init__(self, spec: Any = "math", reference_column: str = "answer", **kwargs):
        self.checker = resolve(spec)
        self.reference_column = reference_column
        kwargs.setdefault("keep_in_memory", True)
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=self.__doc__ or "",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, **columns) -> dict[str, float]:
        columns[self.reference_column] = list(references)
        scores = self.checker.score(completions=list(predictions), **columns)
        n = len(scores.total)
        judged = [t for t in scores.total if t is not None]
        result = {
            "mean_total": sum(judged) / len(judged) if judged else float("nan"),
            "pass_rate": sum(scores.passed) / n if n else float("nan"),
            "none_rate": (n - len(judged)) / n if n else float("nan"),
            "n": n,
        }
        for name, values in scores.breakdown.items():
            present = [v for v in values if v is not None]
            result[f"{name}/mean"] = sum(present) / len(present) if present else float("nan")
        return result


def load_reward_metric(spec: Any = "math", reference_column: str = "answer", **kwargs) -> RewardRulesMetric:
    """Build the metric for a reward spec (anything `resolve` accepts). ``kwargs`` go to `evaluate.Metric`."""
    return RewardRulesMetric(spec, reference_column=reference_column, **kwargs)
