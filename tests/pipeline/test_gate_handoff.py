"""Gates that keep the best model: `gate.on_fail` and the recipe's `final`, checked before anything trains, and
run end to end (an injected regression is carried over; the final model is the best one)."""

from __future__ import annotations

import pytest

from trl_safeppo.pipeline.recipe import RecipeError, recipe_from_dict


def tree(**top) -> dict:
    sft = {"dataset": {"path": "task://arithmetic/sft", "n": 8}, "args": {"max_steps": 1}}
    return {
        "name": "t", "model": "tiny://debug", "output_dir": "/tmp/unused", "reward": "math",
        "eval": {"dataset": {"path": "task://arithmetic/eval", "n": 2}},
        "stages": [{"type": "sft", **sft}, {"type": "sft", "name": "second", **sft}, {"type": "eval"}],
        **top,
    }


def test_final_defaults_to_last_and_accepts_best_heldout():
    assert recipe_from_dict(tree()).final == "last"
    assert recipe_from_dict(tree(final="best_heldout")).final == "best_heldout"
    t = tree()
    t["stages"][1]["gate"] = {"max_heldout_drop": 0.05, "on_fail": "carry_previous"}
    assert recipe_from_dict(t).stages[1].gate["on_fail"] == "carry_previous"


@pytest.mark.parametrize(
    "mutate, where, message",
    [
        (lambda t: t.update(final="best-heldout"), "final",
         r"final: unknown value 'best-heldout' \(did you mean 'best_heldout'\?\)\. Fix: use one of the accepted values: "
         r"last, best_heldout"),
        (lambda t: t.pop("eval") and t.update(final="best_heldout"), "final",
         r"final: `final: best_heldout` chooses by the held-out evaluation, and the recipe has no `eval.dataset`"),
        (lambda t: t["stages"][1].update(gate={"on_fail": "carry-previous"}), r"stages[1] (second).gate.on_fail",
         r"stages\[1\] \(second\)\.gate\.on_fail: unknown value 'carry-previous' \(did you mean 'carry_previous'\?\)\. "
         r"Fix: use one of the accepted values: stop, carry_previous"),
        (lambda t: t["stages"][0].update(gate={"on_fail": "carry_previous"}), r"stages[0] (sft).gate.on_fail",
         r"`carry_previous` on the first training stage: there is no previous model to carry over\. Fix: write "
         r"`on_fail: stop`"),
        (lambda t: t["stages"][2].update(gate={"on_fail": "carry_previous"}), r"stages[2] (eval).gate.on_fail",
         r"`carry_previous` on an? eval stage, which trains no model"),
    ],
)
def test_bad_on_fail_and_final_are_refused_before_anything_trains(mutate, where, message):
    t = tree()
    mutate(t)
    with pytest.raises(RecipeError, match=message) as info:
        recipe_from_dict(t)
    assert info.value.where == where


def test_carry_previous_on_the_first_training_stage_after_an_eval_stage_is_refused():
    t = tree()
    t["stages"].insert(0, {"type": "eval"})  # evaluates the starting model: still no previous *trained* model
    t["stages"][1]["gate"] = {"on_fail": "carry_previous"}
    with pytest.raises(RecipeError, match=r"stages\[1\] \(sft\)\.gate\.on_fail: `carry_previous` on the first training"):
        recipe_from_dict(t)


# ---------------------------------------------------------------- end to end: an injected regression
def regression_recipe(out) -> dict:
    """SFT warm start, then two stages at a destructive learning rate (1.0: the loss goes from ~2 to ~100 and the
    policy collapses onto one token), the first gated with `carry_previous`, the second not gated at all.

    "Accuracy" here is the SFT-taught phrasing: the regex rule `The answer` (after 30 SFT steps on the arithmetic
    task's plain-text targets, tiny://arithmetic starts its greedy answers with it; the collapsed policy does not),
    a behaviour a short warm start learns for sure, so the test needs no long training.
    """
    sft_data = {"path": "task://arithmetic/sft", "n": 960}
    wreck = {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 48},
             "args": {"max_steps": 3, "per_device_train_batch_size": 16, "learning_rate": 1.0, "logging_steps": 1,
                      "save_steps": 1000}}
    return {
        "name": "regression", "model": "tiny://arithmetic", "output_dir": str(out), "final": "best_heldout",
        "reward": [{"name": "format", "weight": 0.5}, {"name": "math"}],
        "eval": {"dataset": {"path": "task://arithmetic/eval", "n": 24}, "max_new_tokens": 12, "batch_size": 24,
                 "accuracy_reward": {"name": "regex", "pattern": "The answer"}},
        "stages": [
            {"type": "sft", "dataset": sft_data,
             "args": {"max_steps": 30, "per_device_train_batch_size": 32, "learning_rate": 3.0e-3, "logging_steps": 5,
                      "save_steps": 1000}},
            {**wreck, "name": "wreck", "gate": {"max_heldout_drop": 0.05, "on_fail": "carry_previous"}},
            {**wreck, "name": "wreck-ungated"},
            {"type": "eval", "name": "final-eval"},
        ],
    }


def test_a_destructive_stage_is_carried_over_and_the_final_model_is_the_best(tmp_path):
    import json

    import yaml

    from trl_safeppo.pipeline.runner import run_recipe

    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(regression_recipe(out), sort_keys=False))
    assert run_recipe(str(recipe)) == 0

    def manifest():
        return json.loads((out / "manifest.json").read_text())

    m = manifest()
    sft, wreck, ungated, final_eval = m["stages"]
    assert m["status"] == "completed"
    assert [s["status"] for s in m["stages"]] == ["completed", "carried", "completed", "completed"]
    best = sft["eval"]["accuracy"]
    assert best >= 0.5, sft["eval"]  # the warm start learned the phrasing...
    assert wreck["eval"]["accuracy"] < best - 0.05  # ...and the learning rate of 1.0 destroyed it: the gate failed
    drop = next(g for g in wreck["gates"] if g["gate"] == "heldout_drop")
    assert not drop["passed"] and drop["values"]["previous"] == best
    # carried over: recorded, and the next stage started from the SFT model (path and content hash), not the wreck's
    sft_final = sft["outputs"]["final"]
    assert wreck["handoff"] == {"decision": "carry_previous", "model": sft_final["path"], "hash": sft_final["hash"],
                                "reason": f"heldout_drop: {drop['reason']}"}
    assert ungated["inputs"]["model"] == {"path": sft_final["path"], "hash": sft_final["hash"]}
    assert wreck["outputs"]["final"]["hash"] != sft_final["hash"]
    # the ungated stage at lr 1.0 regressed too, and was handed on (no gate): its input gate compares with the SFT
    assert ungated["eval"]["accuracy"] < best
    # final: best_heldout -> the SFT model (the carried-over wreck is no candidate); the final eval evaluated it
    assert m["final"]["policy"] == "best_heldout" and m["final"]["stage"] == "01-sft"
    assert m["final"]["path"] == sft_final["path"] and m["final"]["accuracy"] == best
    assert [c["stage"] for c in m["final"]["candidates"]] == ["01-sft", "03-wreck-ungated"]
    assert final_eval["inputs"]["model"] == {"path": sft_final["path"], "hash": sft_final["hash"]}
    assert final_eval["eval"]["accuracy"] == best  # the same greedy answers on the same 24 prompts
    # KL to the SFT model: 0 for itself, large for the collapsed policies
    assert sft["eval"]["kl_to_reference"] == 0.0 and sft["eval"]["kl_reference"] == "01-sft"
    assert wreck["eval"]["kl_to_reference"] > 0.1 and final_eval["eval"]["kl_to_reference"] < 1e-6
    md = (out / "report.md").read_text()
    assert "- **Final model:** 01-sft (final: best\\_heldout, best held-out accuracy" in md
    row = next(line for line in md.splitlines() if line.startswith("| 2 | wreck | sft | carried |"))
    assert f"carried over (gate failed: heldout\\_drop: {drop['reason']}); the next stage started from the " \
           "previous model (01-sft) |" in row
    assert (out / "plots" / "overview.png").is_file()

    # a rerun skips everything: the carried stage's gate is re-checked, nothing trains again
    assert run_recipe(str(recipe)) == 0
    again = manifest()
    assert [s["status"] for s in again["stages"]] == ["completed", "carried", "completed", "completed"]
    assert [s["timings"]["attempts"] for s in again["stages"]] == [1, 1, 1, 1]

    # relaxing the gate hands the wreck's model on now: the stage after it starts from another model, so it (and
    # everything after it) runs again; the wreck itself is not retrained
    assert run_recipe(str(recipe), ["stages.wreck.gate.max_heldout_drop=1.0"]) == 0
    relaxed = manifest()
    assert [s["status"] for s in relaxed["stages"]] == ["completed", "completed", "completed", "completed"]
    assert [s["timings"]["attempts"] for s in relaxed["stages"][:2]] == [1, 1]
    wreck_final = relaxed["stages"][1]["outputs"]["final"]
    assert relaxed["stages"][2]["inputs"]["model"] == {"path": wreck_final["path"], "hash": wreck_final["hash"]}
    assert "handoff" not in relaxed["stages"][1]
    assert relaxed["final"]["stage"] == "01-sft"  # still the best held-out model
