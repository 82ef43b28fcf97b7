"""The recipe format: structure checks, key.path=value overrides and ${...} references (no torch, no training)."""

from __future__ import annotations

import pytest

from trl_safeppo.pipeline.recipe import (
    RecipeError,
    apply_overrides,
    load_recipe,
    parse_override,
    recipe_from_dict,
    resolve_references,
)


def base(**extra):
    tree = {
        "name": "t",
        "model": "tiny://debug",
        "output_dir": "/tmp/unused",
        "stages": [
            {"type": "sft", "dataset": "task://arithmetic/sft", "args": {"max_steps": 2}},
            {"type": "grpo", "dataset": "task://arithmetic/rl", "args": {"max_steps": 3}},
        ],
    }
    tree.update(extra)
    return tree


def test_defaults_names_and_init():
    recipe = recipe_from_dict(base(stages=[{"type": "sft"}, {"type": "grpo"}, {"type": "sft"}]))
    assert [s.name for s in recipe.stages] == ["sft", "grpo", "sft-2"]  # a repeated type gets -2
    assert [s.init for s in recipe.stages] == [None, None, None]  # None = previous (the recipe's model for stage 0)
    assert recipe.seed == 0 and recipe.rails == {} and recipe.probes == []


def test_overrides_parse_values_as_yaml_and_address_stages_by_name():
    assert parse_override("seed=3") == ("seed", 3)
    assert parse_override("stages.0.args.learning_rate=1.0e-4") == ("stages.0.args.learning_rate", 1e-4)
    assert parse_override("stages.0.args.report_to=[a, b]") == ("stages.0.args.report_to", ["a", "b"])
    recipe = recipe_from_dict(base(), ["stages.grpo.args.max_steps=7", "stages.0.args.logging_steps=1", "seed=5"])
    assert recipe.stages[1].args == {"max_steps": 7}
    assert recipe.stages[0].args == {"max_steps": 2, "logging_steps": 1}  # a new key is added
    assert recipe.seed == 5


def test_override_errors_name_the_path():
    with pytest.raises(RecipeError, match="no '='"):
        parse_override("seed")
    with pytest.raises(RecipeError, match=r"no stage named 'grop' \(did you mean 'grpo'\?\)"):
        apply_overrides(base(), ["stages.grop.args.max_steps=1"])
    with pytest.raises(RecipeError, match="index 5 is out of range"):
        apply_overrides(base(), ["stages.5.args.max_steps=1"])


def test_references_keep_types_and_format_into_strings(monkeypatch):
    monkeypatch.setenv("TRL_SAFEPPO_TEST_RUNS", "/runs")
    tree = base(output_dir="${env:TRL_SAFEPPO_TEST_RUNS}/${name}-${seed}", seed=4)
    tree["stages"][1]["args"]["max_completion_length"] = 24
    tree["stages"][0]["args"]["max_length"] = "${stages.grpo.args.max_completion_length}"
    out = resolve_references(tree)
    assert out["output_dir"] == "/runs/t-4"
    assert out["stages"][0]["args"]["max_length"] == 24  # a whole-string reference keeps the int
    assert resolve_references({"a": "${env:TRL_SAFEPPO_UNSET_VAR,fallback}"})["a"] == "fallback"


def test_references_see_overrides_and_detect_cycles():
    tree = base()
    tree["stages"][0]["args"]["max_steps"] = "${stages.1.args.max_steps}"
    recipe = recipe_from_dict(tree, ["stages.1.args.max_steps=9"])
    assert recipe.stages[0].args["max_steps"] == 9
    with pytest.raises(RecipeError, match="circular reference: a -> b -> a"):
        resolve_references({"a": "${b}", "b": "${a}"})
    with pytest.raises(RecipeError, match=r"\$\{sede\} does not resolve: no key 'sede' \(did you mean 'seed'\?\)"):
        resolve_references(base(name="${sede}", seed=1))


@pytest.mark.parametrize(
    "mutate, where, message",
    [
        (lambda t: t.update(stagse=[]), "stagse", r"unknown key 'stagse' in the recipe \(did you mean 'stages'\?\)"),
        (lambda t: t["stages"][1].update(type="gpro"), "stages[1].type", r"unknown stage type 'gpro' \(did you mean 'grpo'\?\)"),
        (lambda t: t["stages"][0].update(arsg={}), "stages[0].arsg", r"unknown key 'arsg' in a stage \(did you mean 'args'\?\)"),
        (lambda t: t["stages"][0].update(init="previous"), "stages[0] (sft).init", "no previous stage"),
        (lambda t: t.update(seed="zero"), "seed", "seed must be an integer, got str 'zero'"),
        (lambda t: t.update(seed=True), "seed", "seed must be an integer, got bool True"),
        (lambda t: t["stages"][1].update(args=[1]), "stages[1] (grpo).args", "args must be a mapping"),
        (lambda t: t["stages"][1].update(peft={"r": 8, "handoff": "fuse"}), "stages[1] (grpo).peft.handoff",
         "unknown hand-off policy 'fuse'"),
        (lambda t: t["stages"][1].update(name="sft"), "stages[1].name", r"already used by stages\[0\]"),
        (lambda t: t.pop("model"), "model", "required key 'model' is missing"),
    ],
)
def test_structure_errors_name_the_key_path_and_the_fix(mutate, where, message):
    tree = base()
    mutate(tree)
    with pytest.raises(RecipeError, match=message) as info:
        recipe_from_dict(tree, source="r.yaml")
    assert info.value.where == where
    assert str(info.value).startswith(f"r.yaml: {where}: ")
    assert "Fix: " in str(info.value)


def test_load_recipe_reads_yaml_safely(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nmodel: tiny://debug\noutput_dir: out\nstages:\n  - {type: sft, args: {learning_rate: 1e-4}}\n")
    recipe = load_recipe(path)
    # PyYAML (YAML 1.1) reads 1e-4 as a string; schema.coerce turns it into a float against the config's field
    assert recipe.stages[0].args == {"learning_rate": "1e-4"}
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):  # safe_load: no code from recipe text
        load_recipe(path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


_DEMO = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml")


def test_builtin_recipes_are_the_repository_recipes_and_load_by_name_from_anywhere(tmp_path, monkeypatch):
    from pathlib import Path

    from trl_safeppo.pipeline.recipe import builtin_recipes

    repo_recipes = Path(_DEMO).parent
    shipped = builtin_recipes()
    # trl_safeppo/recipes is the repository's recipes/ folder (installed with the wheel): same names, same text
    assert sorted(shipped) == sorted(p.stem for p in repo_recipes.glob("*.yaml")) and "demo" in shipped
    for name, path in shipped.items():
        assert path.read_text() == (repo_recipes / f"{name}.yaml").read_text()
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here, as for a pip user
    expected = load_recipe(_DEMO).to_dict()
    for spelling in ("demo", "demo.yaml", "recipes/demo.yaml"):
        assert load_recipe(spelling).to_dict() == expected
    with pytest.raises(RecipeError, match=r"recipe file 'demo2' does not exist.*built-in recipe by name \(demo, gsm8k"):
        load_recipe("demo2")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "demo.yaml").write_text("name: mine\nmodel: tiny://debug\noutput_dir: out\nstages:\n"
                                                   "  - {type: sft}\n")
    assert load_recipe("recipes/demo.yaml").name == "mine"  # a file that exists always wins over a built-in


# --- key paths use the same default stage names as the parser; an explicit empty probe list is refused
def test_override_addresses_a_stage_by_its_default_name():
    from trl_safeppo.pipeline.recipe import load_recipe

    # demo.yaml has two sft stages: the first is unnamed ("sft" by default), the second is named sft-rs
    recipe = load_recipe(_DEMO, overrides=["stages.sft.args.max_steps=2", "stages.sft-rs.args.max_steps=3"])
    by_name = {s.name: s for s in recipe.stages}
    assert by_name["sft"].args["max_steps"] == 2
    assert by_name["sft-rs"].args["max_steps"] == 3


def test_stage_names_rule():
    from trl_safeppo.pipeline.recipe import stage_names

    raw = [{"type": "sft"}, {"type": "grpo"}, {"type": "sft"}, {"type": "sft", "name": "x"}, {"type": "sft"}]
    # unnamed stages: the first of a type keeps the type, the k-th gets -k (k counts earlier stages of that type)
    assert stage_names(raw) == ["sft", "grpo", "sft-2", "x", "sft-4"]


@pytest.mark.parametrize("probes", [[], ["ok", 3]])
def test_explicit_bad_probe_list_is_refused(tmp_path, probes):
    import yaml

    from trl_safeppo.pipeline.recipe import load_recipe

    tree = yaml.safe_load(open(_DEMO))
    tree["probes"] = probes
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match="probes"):
        load_recipe(str(path))
