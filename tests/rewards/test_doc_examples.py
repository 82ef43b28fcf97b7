"""The custom rules of docs/rewards.md ("Writing your own rule") work as written: the Python block saved as the module
the YAML block lists under `imports:`, beside a recipe, passes the whole pre-flight, its verifier self-test included
(a gold answer reaches full marks, a wrong one does not)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from trl_safeppo.pipeline.preflight import preflight
from trl_safeppo.pipeline.recipe import load_recipe

DOC = Path(__file__).resolve().parents[2] / "docs" / "rewards.md"


def _section_blocks(title: str) -> dict[str, list[str]]:
    text = DOC.read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        blocks.setdefault(lang, []).append(body)
    return blocks


@pytest.fixture
def doc_rules(tmp_path, monkeypatch):
    """The docs' module, written where the docs say (the recipe's folder), imported fresh."""
    blocks = _section_blocks("Writing your own rule")
    (python,), (spec,) = blocks["python"], blocks["yaml"]
    spec = yaml.safe_load(spec)
    folder = tmp_path / "project"
    folder.mkdir()
    for module in spec["imports"]:
        (folder / f"{module}.py").write_text(python)
        monkeypatch.delitem(sys.modules, module, raising=False)
    yield folder, spec
    for module in spec["imports"]:
        sys.modules.pop(module, None)
    sys.path[:] = [p for p in sys.path if p != str(folder)]


def test_doc_example_rules_pass_the_preflight_self_test(doc_rules, tmp_path, monkeypatch):
    folder, spec = doc_rules
    assert spec["imports"] == ["my_rules"] and [r["name"] for r in spec["reward"]][1:] == ["my_rules:no_hedging",
                                                                                            "my_rules:max_words"]
    recipe = {
        "name": "doc-rules", "model": "tiny://debug", "output_dir": "runs/doc-rules", **spec,
        "stages": [{"type": "grpo", "dataset": {"path": "task://arithmetic/rl", "n": 16},
                    "args": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4}}],
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    elsewhere = tmp_path / "elsewhere"  # the working directory is not the recipe's folder
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = preflight(load_recipe(path), check_hardware=False)  # raises if the self-test fails
    from trl_safeppo.rewards import resolve

    checker = resolve(plan.stages[0].reward, imports=["my_rules"])
    assert checker.rule_names == ["math", "no_hedging", "max_words"]
    # full marks 1 + 0.2 + 0.2 = 1.4 for a short, unhedged, right answer; a hedge loses 0.2, 41 words lose 0.2
    scores = checker(completions=["<answer>7</answer>", "maybe <answer>7</answer>", "w " * 41 + "<answer>7</answer>"],
                     answer=["7", "7", "7"])
    assert scores == pytest.approx([1.4, 1.2, 1.2])


def test_doc_example_module_is_found_beside_the_recipe_only_when_listed(doc_rules, tmp_path, monkeypatch):
    from trl_safeppo.pipeline.recipe import RecipeError

    folder, spec = doc_rules
    recipe = {"name": "doc-rules", "model": "tiny://debug", "output_dir": "runs/x", "reward": spec["reward"],
              "self_test": False, "stages": [{"type": "eval", "dataset": {"path": "task://arithmetic/eval", "n": 2}}]}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        preflight(load_recipe(path), check_hardware=False)
    assert str(info.value) == (f"{path}: reward[1].name: reward 'my_rules:no_hedging': module 'my_rules' is not "
                               "listed under the recipe's `imports:`. Fix: add `imports: [my_rules]` at the top of "
                               "the recipe")
    assert "my_rules" not in sys.modules  # refused before any import


def test_check_rewards_cli_finds_the_recipes_rule_module(doc_rules, tmp_path, monkeypatch, capsys):
    # `trl-safeppo check-rewards --reward recipe.yaml` imports the recipe's `imports:` as `run` does, and the rules
    # pickle into a spawned worker process (which finds the module through the same search path)
    folder, spec = doc_rules
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    from trl_safeppo.cli import main

    assert main(["check-rewards", "--reward", str(path), "-n", "8", "--processes", "1", "--threads", "2"]) == 0, \
        capsys.readouterr()
