"""resolve / validate_spec: every form of the reward spec and errors naming the key path."""

from __future__ import annotations

import pickle

import pytest

from trl_safeppo.rewards import BUILTINS, RuleChecker, resolve, validate_spec

GOOD = "<think>3+4</think><answer>7</answer>"


def test_every_builtin_resolves_by_name():
    needs = {"regex": {"pattern": "x"}, "length": {"max": 10}}
    for name in BUILTINS:
        c = resolve({"name": name, **needs.get(name, {})})
        assert isinstance(c, RuleChecker) and c.__name__ == name and c.rule_names == [name]


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_pickles_with_its_name_and_scores(name):
    needs = {"regex": {"pattern": "7"}, "length": {"max": 100}, "code_tests": {"timeout": 10}}
    checker = resolve({"name": name, **needs.get(name, {})})
    copy = pickle.loads(pickle.dumps(checker))
    assert copy.__name__ == name == type(copy.components[0].func)(**needs.get(name, {})).__name__
    batch = {"completions": [GOOD], "answer": ["7"], "unsafe": [False], "tests": ["assert True"]}
    assert copy(**batch) == checker(**batch)


def test_forms_of_the_spec():
    assert resolve("math")(completions=[GOOD], answer=["7"]) == [1.0]
    # Flat options and kwargs: are the same thing.
    assert resolve({"name": "length", "max": 3}).components[0].func.max == 3
    assert resolve({"name": "length", "kwargs": {"max": 3}}).components[0].func.max == 3
    c = resolve([{"name": "format", "weight": 0.5, "gate": {"below": 1.0, "value": -1.0}}, "math"])
    assert c(completions=[GOOD, "7"], answer=["7", "7"]) == [1.5, -1.0]  # 0.5 + 1; "7" fails format -> -1
    c = resolve({"rules": [{"name": "math"}, {"name": "math", "alias": "math_full", "extract": "full"}],
                 "name": "r1", "pass_threshold": 1.0})
    assert c.__name__ == "r1" and c.rule_names == ["math", "math_full"] and c.pass_threshold == 1.0
    # A gate written on one rule about another one (`on`).
    c = resolve([{"name": "format", "weight": 0.5}, {"name": "math", "gate": {"on": "format", "below": 1.0}}])
    assert c.gates[0].on == "format" and c.gates[0].value == 0.0


def test_dotted_paths_functions_and_factories():
    assert resolve("rewards.user_rules:starts_with_yes")(completions=["yes", "no"]) == [1.0, 0.0]
    assert resolve("rewards.user_rules.starts_with_yes").__name__ == "starts_with_yes"
    c = resolve({"name": "rewards.user_rules:make_contains", "word": "cat", "weight": 2.0})
    assert c.rule_names == ["contains"] and c(completions=["a cat", "dog"]) == [2.0, 0.0]
    assert resolve(resolve("math")).__name__ == "math"  # a checker passes through
    from . import user_rules

    c = resolve([user_rules.starts_with_yes, {"name": user_rules.make_contains, "word": "s", "weight": 0.5}])
    assert c.rule_names == ["starts_with_yes", "contains"] and c(completions=["yes", "no"]) == [1.5, 0.0]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope", r"reward\.name: unknown rule 'nope'"),
        ([{"name": "math"}, {"weight": 1.0}], r"reward\[1\]: missing key `name`"),
        ([{"name": "math", "weight": "high"}], r"reward\[0\]\.weight: expected a finite number, got str"),
        ([{"name": "math", "weight": float("nan")}], r"reward\[0\]\.weight: expected a finite number"),
        ({"name": "length", "maximum": 3}, r"reward: unknown option\(s\) \['maximum'\] for rule 'length'"),
        ({"name": "length", "max": 3, "kwargs": {"max": 4}}, r"given both flat and under `kwargs`"),
        ({"name": "length", "min": 5, "max": 1}, r"reward: reward rule 'length': min \(5\) is larger"),
        ([{"name": "math", "gate": {"value": 0}}], r"reward\[0\]\.gate: missing key `below`"),
        ([{"name": "math", "gate": {"below": 1, "when": 2}}], r"reward\[0\]\.gate: unknown key\(s\) \['when'\]"),
        ([{"name": "math", "gate": {"on": "format", "below": 1}}], r"reward\[0\]\.gate\.on: no rule named 'format'"),
        (["math", "math"], r"reward\[1\]: rule name 'math' appears more than once"),
        ([], r"reward: the list of rules is empty"),
        ({"rules": "math"}, r"reward\.rules: expected a list"),
        ({"rules": ["math"], "threshold": 1}, r"reward: unknown key\(s\) \['threshold'\]"),
        ("no_such_module_xyz.rules:fn", r"'no_such_module_xyz.rules:fn' does not import"),
        ("rewards.user_rules:missing", r"has no attribute 'missing'"),
        ("rewards.user_rules:NOT_CALLABLE", r"is a int without the reward mark, so it is not called"),
        ("rewards.user_rules:unmarked", r"is a callable without the reward mark, so it is not called"),
        ({"name": "rewards.user_rules:starts_with_yes", "k": 1}, r"is a @reward_function, which takes no options"),
        ("os.system", r"reward\.name: reward 'os.system' is in the standard library \('os'\)"),
        (3, r"reward: expected a rule name"),
    ],
)
def test_validate_spec_errors_name_the_key_path(spec, match):
    with pytest.raises(ValueError, match=match):
        validate_spec(spec)


def test_recipe_imports_gate_dotted_paths():
    # a recipe's `imports:` list: the module must be listed (a package covers its submodules)
    assert resolve("rewards.user_rules:starts_with_yes", imports=["rewards"]).__name__ == "starts_with_yes"
    with pytest.raises(ValueError, match=r"module 'rewards.user_rules' is not listed under the recipe's `imports:` "
                                         r"\(it lists \['other'\]\). Fix: add `imports: \[rewards.user_rules\]`"):
        resolve("rewards.user_rules:starts_with_yes", imports=["other"])
    # a built-in's own dotted path is the built-in (no listing needed)
    assert resolve("trl_safeppo.rewards.rules.math:math_reward", imports=[]).rule_names == ["math"]


def test_validate_spec_custom_root():
    with pytest.raises(ValueError, match=r"stages\[2\]\.reward\[0\]\.weight"):
        validate_spec([{"name": "math", "weight": None}], path="stages[2].reward")
    assert validate_spec([{"name": "format", "weight": 0.5}, {"name": "math"}]) is None
