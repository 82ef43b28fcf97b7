"""json rule: validity and schema conformance."""

from __future__ import annotations

import pickle

import pytest

from trl_safeppo.rewards.rules.structured import json_reward

SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ('<answer>{"x": 1}</answer>', 1.0),
        ('<answer>```json\n{"x": 2}\n```</answer>', 1.0),         # fenced block
        ('<answer>{"x": "one"}</answer>', 0.5),                   # valid JSON, wrong type -> valid_score
        ('<answer>{"y": 1}</answer>', 0.5),                       # missing required key
        ("<answer>{x: 1}</answer>", 0.0),                         # not JSON
        ("<answer></answer>", 0.0),
    ],
)
def test_json_schema_table(completion, expected):
    assert json_reward(schema=SCHEMA)(completions=[completion]) == [expected]


def test_json_without_schema_and_per_row_schema():
    assert json_reward()(completions=["[1, 2]", "[1, 2"]) == [1.0, 0.0]
    rule = json_reward(schema_column="schema")
    schemas = ['{"type": "array"}', {"type": "object"}, "not json"]
    assert rule(completions=["[1]", "[1]", "[1]"], schema=schemas) == [1.0, 0.5, None]


def test_json_bad_schema_and_pickle():
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        json_reward(schema={"type": 12})
    copy = pickle.loads(pickle.dumps(json_reward(schema=SCHEMA)))
    assert copy.__name__ == "json" and copy(completions=['{"x": 3}']) == [1.0]
