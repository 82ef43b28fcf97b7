"""Stage args checked against the fields and annotations of a config dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import pytest

from trl_safeppo.pipeline.recipe import RecipeError
from trl_safeppo.pipeline.schema import _NO_VALUE, check_args, coerce


class Mode(enum.Enum):
    STEPS = "steps"
    EPOCH = "epoch"


@dataclass
class Toy:
    learning_rate: float = 1e-3
    max_steps: int = -1
    bf16: bool | None = None
    report_to: None | str | list[str] = None
    loss_type: Literal["grpo", "dr_grpo"] = "grpo"
    save_strategy: Mode | str = "steps"
    lr_scheduler_kwargs: dict | str | None = None
    tags: list[int] = field(default_factory=list)


@pytest.mark.parametrize(
    "value, annotation, expected",
    [
        (1, float, 1),  # an int is a valid float, kept as written
        ("1e-4", float, 1e-4),  # PyYAML 1.1 reads 1e-4 as a string
        ("3.0e-3", float, 3.0e-3),
        (True, float, _NO_VALUE),  # bool is not a number here
        (True, int, _NO_VALUE),
        (2.5, int, _NO_VALUE),
        ("epoch", Mode, "epoch"),
        ("daily", Mode, _NO_VALUE),
        ([1, 2], list[int], [1, 2]),
        ([1, "x"], list[int], _NO_VALUE),
        (None, int | None, None),
        ("1e-4", str | float, "1e-4"),  # a string is kept where a string is accepted
    ],
)
def test_coerce(value, annotation, expected):
    assert coerce(value, annotation) == expected if expected is not _NO_VALUE else coerce(value, annotation) is _NO_VALUE


def test_check_args_coerces_and_accepts_unions():
    out = check_args(
        {"learning_rate": "5e-5", "report_to": ["none"], "loss_type": "dr_grpo", "save_strategy": "epoch"},
        Toy, where="stages[0] (sft).args", what="Toy",
    )
    assert out == {"learning_rate": 5e-5, "report_to": ["none"], "loss_type": "dr_grpo", "save_strategy": "epoch"}


def test_unknown_key_suggests_the_closest_field():
    with pytest.raises(RecipeError, match=r"unknown key 'learning_rte' in Toy \(did you mean 'learning_rate'\?\)") as info:
        check_args({"learning_rte": 1e-4}, Toy, where="stages[2] (grpo).args", what="Toy")
    assert info.value.where == "stages[2] (grpo).args.learning_rte"


def test_wrong_type_names_field_value_and_expected_type():
    with pytest.raises(RecipeError, match=r"expected an integer, got str 'ten'") as info:
        check_args({"max_steps": "ten"}, Toy, where="stages[1] (ppo).args", what="Toy")
    assert info.value.where == "stages[1] (ppo).args.max_steps"
    with pytest.raises(RecipeError, match=r"expected one of 'grpo', 'dr_grpo', got str 'bnpo'"):
        check_args({"loss_type": "bnpo"}, Toy, where="a", what="Toy")


def test_reserved_keys_are_refused_with_the_fix():
    with pytest.raises(RecipeError, match="`max_steps` is set by the runner. Fix: use the recipe"):
        check_args({"max_steps": 3}, Toy, where="a", what="Toy", reserved={"max_steps": "use the recipe"})
