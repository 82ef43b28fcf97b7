"""Rule-based deterministic rewards (DeepSeek-R1 style) with TRL's reward-function signature.

``resolve(spec)`` turns a reward spec (a built-in name, a dotted path, or a list with weights and gates) into one
picklable `RuleChecker`; see docs/rewards.md. Importing this package is light: math-verify, jsonschema and
subprocesses are only touched when a rule that needs them runs.
"""

from __future__ import annotations

from .base import RewardRuleError, Rule, answer_region, completion_text
from .checker import Component, Gate, RuleChecker, RuleScores
from .spec import BUILTINS, resolve, reward_factory, reward_function, validate_spec

__all__ = [
    "BUILTINS",
    "Component",
    "Gate",
    "RewardRuleError",
    "Rule",
    "RuleChecker",
    "RuleScores",
    "answer_region",
    "completion_text",
    "resolve",
    "reward_factory",
    "reward_function",
    "validate_spec",
]
