"""Pre-flight: every shipped recipe validates (without downloading anything), and each kind of bad input fails with
one error naming the stage index, the key path and the fix, before anything trains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trl_safeppo.pipeline.preflight import preflight
from trl_safeppo.pipeline.recipe import RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def micro(**extra):
    tree = {
        "name": "micro",
        "model": "tiny://debug",
        "output_dir": "/tmp/unused",
        "reward": [{"name": "format", "weight": 0.5}, {"name": "math"}],
        "stages": [
            {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 16}, "args": {"max_steps": 1}},
            {"type": "grpo", "dataset": {"path": "task://arithmetic/rl", "n": 8},
             "args": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4}},
            {"type": "eval", "dataset": {"path": "task://arithmetic/eval", "n": 4}},
        ],
    }
    tree.update(extra)
    return tree


def fails(tree, *, where: str, match: str, check_hardware: bool = False) -> RecipeError:
    with pytest.raises(RecipeError, match=match) as info:
        preflight(recipe_from_dict(tree, source="r.yaml"), check_hardware=check_hardware)
    assert info.value.where == where, str(info.value)
    assert str(info.value).startswith(f"r.yaml: {where}: ") and "Fix: " in str(info.value)
    return info.value


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_passes_preflight(path):
    # check_hardware=False: a GPU recipe (bf16, vLLM) validates on this CPU machine; Hub ids are checked for form
    # only, so nothing is downloaded (the test harness fails any network access).
    plan = preflight(load_recipe(path), check_hardware=False)
    assert len(plan.stages) == len(load_recipe(path).stages) >= 1


def test_shipped_recipes_exist():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "gsm8k.yaml"} <= names


def test_micro_plan_resolves_args_and_defaults():
    plan = preflight(recipe_from_dict(micro(seed=3)), check_hardware=False)
    sft, grpo, ev = plan.stages
    assert sft.args["seed"] == 3 and sft.args["report_to"] == "none" and sft.args["max_steps"] == 1
    assert grpo.config_cls.__name__ == "SafeGRPOConfig" and grpo.reward == micro()["reward"]
    assert ev.dataset.kind == "task" and ev.dataset.split == "eval" and ev.dataset.n == 4
    assert sft.init == grpo.init == "previous"


def test_typo_in_a_late_stage_args_fails_with_suggestion():
    tree = micro()
    tree["stages"][1]["args"]["num_generatons"] = 4
    fails(tree, where="stages[1] (grpo).args.num_generatons",
          match=r"unknown key 'num_generatons' in SafeGRPOConfig \(did you mean 'num_generations'\?\)")


def test_wrong_value_type_in_args():
    tree = micro()
    tree["stages"][0]["args"]["max_steps"] = "two"
    fails(tree, where="stages[0] (sft).args.max_steps", match="expected an integer, got str 'two'")


def test_config_post_init_errors_are_reported_for_the_stage():
    tree = micro()
    tree["stages"][1]["args"]["per_device_train_batch_size"] = 3  # 3 completions cannot hold groups of 4
    fails(tree, where="stages[1] (grpo).args", match="SafeGRPOConfig rejects these args")


def test_bf16_on_a_cpu_machine_is_caught_when_running(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tree = micro()
    tree["stages"][0]["args"]["bf16"] = True
    fails(tree, where="stages[0] (sft).args", match="rejects these args", check_hardware=True)
    preflight(recipe_from_dict(tree), check_hardware=False)  # --check on a CPU machine: masked, passes


def test_runner_owned_args_are_refused():
    tree = micro()
    tree["stages"][0]["args"]["output_dir"] = "/elsewhere"
    fails(tree, where="stages[0] (sft).args.output_dir", match="set by the runner")


def test_missing_dataset_column(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(3)) + "\n")
    tree = micro()
    tree["stages"][0]["dataset"] = str(data)  # an SFT stage needs a completion (or messages, or text)
    err = fails(tree, where="stages[0] (sft).dataset", match=r"needs the columns \{prompt, completion\}")
    assert "missing ['completion']" in str(err) and "columns: {old: new}" in str(err)
    tree["stages"][0]["dataset"] = {"path": str(data), "columns": {"answer": "completion"}}  # the fix works
    preflight(recipe_from_dict(tree), check_hardware=False)


def test_unreadable_or_missing_dataset_path(tmp_path):
    tree = micro()
    tree["stages"][1]["dataset"] = str(tmp_path / "nope.jsonl")
    fails(tree, where="stages[1] (grpo).dataset", match="does not exist")
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.jsonl"
        locked.write_text('{"prompt": "x"}\n')
        locked.chmod(0)
        tree["stages"][1]["dataset"] = str(locked)
        fails(tree, where="stages[1] (grpo).dataset", match="not readable")


def test_dotted_paths_must_be_listed_import_and_be_declared():
    tree = micro()
    tree["stages"][1]["dataset"] = {"path": "task://arithmetic/rl", "map": "no_such_module.prepare"}
    fails(tree, where="stages[1] (grpo).dataset.map",
          match=r"module 'no_such_module' is not listed under the recipe's `imports:`")
    tree["stages"][1]["dataset"]["map"] = "trl_safeppo.pipeline.formats.R1_SYSTEM_PROMPT"
    fails(tree, where="stages[1] (grpo).dataset.map",
          match="is a str from 'builtins', not a Python function defined in 'trl_safeppo.pipeline.formats'")
    tree = micro(reward="no_such_module.my_reward")
    fails(tree, where="reward.name", match="module 'no_such_module' is not listed under the recipe's `imports:`")
    tree = micro(imports=["no_such_module"])
    fails(tree, where="imports[0]", match="cannot import module 'no_such_module'")


def test_previous_data_needs_a_producer():
    tree = micro()
    tree["stages"][1] = {"type": "sft", "name": "sft-again", "dataset": "previous"}
    fails(tree, where="stages[1] (sft-again).dataset", match="no earlier stage produces sft data")


def test_rl_stage_without_reward():
    tree = micro()
    del tree["reward"]
    tree["stages"] = tree["stages"][:2]
    fails(tree, where="stages[1] (grpo).reward", match="needs a reward")


def test_kept_adapter_is_not_wrapped_twice():
    tree = micro()
    tree["stages"][0]["peft"] = {"r": 4, "lora_alpha": 8, "handoff": "keep"}
    tree["stages"][1]["peft"] = {"r": 4}
    fails(tree, where="stages[1] (grpo).peft", match="arrives as a LoRA adapter")


def test_peft_block_is_checked_against_lora_config():
    tree = micro()
    tree["stages"][0]["peft"] = {"rank": 4}
    fails(tree, where="stages[0] (sft).peft.rank", match=r"unknown key 'rank' in peft.LoraConfig")


def test_gate_eval_and_rails_blocks():
    tree = micro()
    tree["stages"][1]["gate"] = {"kl_budgett": 1.0}
    fails(tree, where="stages[1] (grpo).gate", match="unknown key")
    tree = micro(eval={"dataset": "task://arithmetic/eval", "max_new_tokns": 8})
    fails(tree, where="eval.max_new_tokns", match=r"did you mean 'max_new_tokens'")
    tree = micro(rails={"clipp": {}})
    fails(tree, where="rails", match="unknown keys")
    tree = micro()
    tree["stages"][0]["rails"] = {"clip": {"high": 1.0}}  # SFT has no rails
    fails(tree, where="stages[0] (sft).rails", match="takes no rails")


def test_unknown_init_model():
    tree = micro()
    tree["stages"][1]["init"] = "./no/such/model"
    fails(tree, where="stages[1] (grpo).init", match="does not exist")


def test_reward_self_test_runs_on_the_stage_data():
    # a rule that passes anything: the control completion ("__wrong__" in the answer tags) passes too
    tree = micro(reward=[{"name": "regex", "pattern": ".*"}])
    err = fails(tree, where="reward", match="fails its self-test on 8 rows of this stage's data")
    assert "self_test: false" in str(err)
    preflight(recipe_from_dict(micro(reward=[{"name": "regex", "pattern": ".*"}], self_test=False)),
              check_hardware=False)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from trl_safeppo.cli import main

    tree = micro()
    tree["stages"][2]["type"] = "evaluate"
    path = tmp_path / "bad.yaml"
    path.write_text(__import__("yaml").safe_dump(tree))
    assert main(["run", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err == (f"trl-safeppo run: error: {path}: stages[2].type: unknown stage type 'evaluate' (did you mean "
                   "'eval'?). Fix: use one of: sft, ppo, grpo, rejection_sampling, dpo, eval")


def test_probes_list_or_mapping():
    plan = preflight(recipe_from_dict(micro(probes={"prompts": ["What is 2 + 2?"], "system_prompt": "Be brief.",
                                                    "max_new_tokens": 8})), check_hardware=False)
    assert plan.probes == ["What is 2 + 2?"] and plan.probe_options == {"system_prompt": "Be brief.", "max_new_tokens": 8}
    fails(micro(probes={"prompts": ["x"], "system": "Be brief."}), where="probes.system",
          match=r"did you mean 'system_prompt'")
    fails(micro(probes={"prompts": []}), where="probes.prompts", match="the list is empty")


def test_reward_self_test_uses_the_stage_reward_timeout(monkeypatch):
    # the self-test runs every rule under the timeout the stage's trainer will use: its args.reward_timeout_s, or
    # the config's default (60 s); a hanging rule is tested in tests/rewards/test_selftest.py.
    import trl_safeppo.rewards.selftest as selftest

    seen = []
    real = selftest.check_rewards
    monkeypatch.setattr(selftest, "check_rewards", lambda *a, **kw: seen.append(kw["timeout_s"]) or real(*a, **kw))
    preflight(recipe_from_dict(micro()), check_hardware=False)
    tree = micro()
    tree["stages"][1]["args"]["reward_timeout_s"] = 7.5
    preflight(recipe_from_dict(tree), check_hardware=False)
    assert seen == [60.0, 7.5]
    tree["stages"][1]["args"]["reward_timeout_s"] = -3
    fails(tree, where="stages[1] (grpo).args", match=r"reward_timeout_s=-3 is invalid")
