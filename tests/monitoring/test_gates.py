"""Gates between stages and early stops inside a stage (trl_safeppo/monitoring/gates.py)."""

from __future__ import annotations

import math

import pytest

from trl_safeppo.monitoring.gates import (
    EVAL_METRICS,
    GateConfig,
    KLBudgetCallback,
    PlateauCallback,
    evaluate_gates,
    failed,
    window_gain,
)


# ---------------------------------------------------------------- window gain


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.0, 0.1, 0.2, 0.3], 0.3),  # slope 0.1 per log, span 3 logs -> 0.3
        ([1.0, 1.0, 1.0], 0.0),  # flat
        ([0.0, 1.0, 0.0], 0.0),  # x = 0,1,2: sxy = (-1)(0-1/3) + 0 + (1)(0-1/3) = 0 -> slope 0
        ([3.0, 2.0, 1.0], -2.0),  # slope -1, span 2
        ([0.0, 0.0, 1.0, 1.0], 1.2),  # x_mean 1.5, sxx = 5, sxy = 1.5*0.5*2 + 0.5*0.5*2... = 2 -> slope 0.4, * 3 = 1.2
    ],
)
def test_window_gain_is_the_fitted_rise(values, expected):
    assert math.isclose(window_gain(values), expected, abs_tol=1e-12)


# ---------------------------------------------------------------- configuration errors


def test_unknown_metric_lists_the_known_names():
    with pytest.raises(ValueError) as err:
        GateConfig.from_dict({"min_metrics": {"acuracy": 0.5}})
    message = str(err.value)
    assert "gates.min_metrics: unknown metric 'acuracy'" in message
    for name in ("reward", "kl", "completions/clipped_ratio", *EVAL_METRICS):
        assert name in message


def test_metric_families_and_eval_metrics_are_accepted():
    cfg = GateConfig.from_dict(
        {"min_metrics": {"accuracy": 0.5, "rewards/math/mean": 0.1}, "max_metrics": {"rails/length/frac": 0.2}}
    )
    assert cfg.min_metrics == {"accuracy": 0.5, "rewards/math/mean": 0.1}


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"plateau_metric": "rewardz"}, "gates.plateau_metric: unknown metric 'rewardz'"),
        ({"heldout_metric": "kl"}, "gates.heldout_metric: 'kl' is not a held-out metric"),
        ({"plateau_window": 2}, "gates.plateau_window: expected an integer >= 3"),
        ({"kl_budget": -1}, "gates.kl_budget: expected a number >= 0"),
        ({"min_metrics": {"accuracy": "high"}}, "gates.min_metrics.accuracy: expected a finite number"),
        ({"min_metrics": ["accuracy"]}, "gates.min_metrics: expected a mapping"),
        ({"plateau": 3}, "gates: unknown key(s) 'plateau'; accepted: min_metrics"),
        ({"no_tripwire_stop": "yes"}, "gates.no_tripwire_stop: expected true or false"),
        ({"plateau_mode": "up"}, "gates.plateau_mode: expected 'max' or 'min'"),
    ],
)
def test_bad_gate_config_is_one_clear_error(raw, fragment):
    with pytest.raises(ValueError, match="^" + fragment.replace("(", r"\(").replace(")", r"\)")):
        GateConfig.from_dict(raw)


# ---------------------------------------------------------------- between-stage gates


def _by_gate(outcomes):
    return {o.gate: o for o in outcomes}


def test_impossible_accuracy_threshold_fails_with_the_reason():
    cfg = GateConfig(min_metrics={"accuracy": 1.01})
    outcomes = evaluate_gates(cfg, eval_metrics={"accuracy": 0.75, "n": 64})
    gate = _by_gate(outcomes)["min:accuracy"]
    assert not gate.passed
    assert gate.reason == "accuracy = 0.75 < 1.01"
    assert [o.gate for o in failed(outcomes)] == ["min:accuracy"]


def test_threshold_on_a_training_metric_uses_its_last_logged_value():
    history = [{"reward": 0.2, "step": 1}, {"reward": 0.6, "step": 2}, {"train_runtime": 3.0, "step": 2}]
    outcomes = _by_gate(evaluate_gates(GateConfig(min_metrics={"reward": 0.5}, max_metrics={"kl": 0.1}), history=history))
    assert outcomes["min:reward"].passed and outcomes["min:reward"].values["reward"] == 0.6
    assert not outcomes["max:kl"].passed and "not measured" in outcomes["max:kl"].reason  # kl never logged


@pytest.mark.parametrize("margin, passes", [(0.05, False), (0.15, True)])
def test_heldout_drop_against_previous_stage(margin, passes):
    # drop = 0.70 - 0.60 = 0.10: over a 0.05 margin, within a 0.15 one
    cfg = GateConfig(max_heldout_drop=margin)
    gate = _by_gate(evaluate_gates(cfg, eval_metrics={"accuracy": 0.60}, previous_eval={"accuracy": 0.70}))
    assert gate["heldout_drop"].passed is passes
    assert math.isclose(gate["heldout_drop"].values["current"], 0.60)


def test_heldout_drop_without_previous_stage_passes():
    gate = _by_gate(evaluate_gates(GateConfig(max_heldout_drop=0.0), eval_metrics={"accuracy": 0.1}))
    assert gate["heldout_drop"].passed and "no previous" in gate["heldout_drop"].reason


def test_kl_budget_on_the_final_logged_kl():
    history = [{"kl": 0.05, "step": 1}, {"kl": 0.3, "step": 2}]
    assert not _by_gate(evaluate_gates(GateConfig(kl_budget=0.2), history=history))["kl_budget"].passed
    assert _by_gate(evaluate_gates(GateConfig(kl_budget=0.5), history=history))["kl_budget"].passed


def test_tripwire_stop_fails_but_warnings_do_not():
    warn = {"step": 3, "detector": "length_collapse", "status": "warn", "reason": "r", "action": "warn"}
    stop = {"step": 7, "detector": "kl_limit", "status": "trip", "reason": "kl = 9 > 5", "action": "stop"}
    rollback_to_stop = {"step": 9, "detector": "non_finite", "status": "trip", "reason": "nan", "action": "rollback",
                        "details": {"stopped": True}}
    cfg = GateConfig()
    assert _by_gate(evaluate_gates(cfg, tripwire_events=[warn]))["no_tripwire_stop"].passed
    gate = _by_gate(evaluate_gates(cfg, tripwire_events=[warn, stop]))["no_tripwire_stop"]
    assert not gate.passed and gate.reason == "tripwire kl_limit stopped training at step 7: kl = 9 > 5"
    assert not _by_gate(evaluate_gates(cfg, tripwire_events=[rollback_to_stop]))["no_tripwire_stop"].passed
    assert evaluate_gates(GateConfig(no_tripwire_stop=False), tripwire_events=[stop]) == []


def test_outcomes_serialize_as_gates_json_rows():
    row = evaluate_gates(GateConfig())[0].to_dict()
    assert set(row) == {"gate", "passed", "reason", "values"}


# ---------------------------------------------------------------- early stop inside a stage


def _state_control():
    from transformers import TrainerControl, TrainerState

    return TrainerState(), TrainerControl()


def test_plateau_callback_stops_once_the_window_is_flat():
    cb = PlateauCallback(window=3, min_gain=0.05)
    state, control = _state_control()
    cb.on_train_begin(None, state, control)
    # rewards 0.1, 0.3, 0.5: gain 0.4 -> go on; then 0.5, 0.52: window [0.5, 0.5, 0.52] gain = 0.01 * 2 = 0.02 < 0.05
    for step, reward in enumerate([0.1, 0.3, 0.5, 0.5, 0.52], start=1):
        state.global_step = step
        cb.on_log(None, state, control, logs={"reward": reward})
        assert control.should_training_stop is (step == 5)
    assert cb.event["gate"] == "plateau" and cb.event["step"] == 5
    assert math.isclose(cb.event["values"]["gain"], 0.02, abs_tol=1e-9)
    outcome = _by_gate(evaluate_gates(GateConfig(plateau_window=3), early_stops=[cb.event]))["plateau"]
    assert outcome.passed and "stopped early at step 5" in outcome.reason  # a plateau is a success


def test_plateau_in_min_mode_watches_a_falling_loss():
    cb = PlateauCallback(window=3, min_gain=0.05, metric="loss", mode="min")
    state, control = _state_control()
    cb.on_train_begin(None, state, control)
    # losses 1.0, 0.8, 0.6: fitted fall 0.4 -> go on; then 0.6, 0.59: window [0.6, 0.6, 0.59] has
    # sxy = (-1)(0.6 - 0.59667) + (1)(0.59 - 0.59667) = -0.01, sxx = 2 -> slope -0.005, fall 0.01 < 0.05 -> stop
    for step, loss in enumerate([1.0, 0.8, 0.6, 0.6, 0.59], start=1):
        state.global_step = step
        cb.on_log(None, state, control, logs={"loss": loss})
        assert control.should_training_stop is (step == 5)
    assert math.isclose(cb.event["values"]["gain"], 0.01, abs_tol=1e-9)
    assert cb.event["reason"].startswith("loss fall over the last 3 logs was 0.01 < 0.05")


def test_plateau_refits_from_restored_history_on_resume():
    cb = PlateauCallback(window=3, min_gain=0.05)
    state, control = _state_control()
    state.log_history = [{"reward": 0.5, "step": 1}, {"reward": 0.5, "step": 2}]
    cb.on_train_begin(None, state, control)
    state.global_step = 3
    cb.on_log(None, state, control, logs={"reward": 0.5})  # third flat value completes the window
    assert control.should_training_stop


def test_kl_budget_callback_stops_and_fails_the_gate():
    cb = KLBudgetCallback(budget=0.1)
    state, control = _state_control()
    for step, kl in enumerate([0.02, 0.08, 0.15], start=1):
        state.global_step = step
        cb.on_log(None, state, control, logs={"kl": kl})
    assert control.should_training_stop and cb.event["step"] == 3
    gate = _by_gate(evaluate_gates(GateConfig(kl_budget=0.1), history=[{"kl": 0.15}], early_stops=[cb.event]))
    assert not gate["kl_budget"].passed and gate["kl_budget"].reason.startswith("kl 0.15 exceeded the budget 0.1")


def test_plateau_gate_ends_a_real_training_run_early(tmp_path, tiny_debug_path):
    """A real transformers Trainer honours the callback: learning rate 0 keeps the loss flat, so with a window of 3
    logs (logging every step) training ends at step 3 of 20."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_debug_path)
    ids = torch.arange(1, 9).reshape(1, 8)
    data = [{"input_ids": ids[0], "labels": ids[0]}] * 4
    cfg = GateConfig(plateau_window=3, plateau_min_gain=1e-3, plateau_metric="loss", plateau_mode="min")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, learning_rate=0.0, logging_steps=1,
                             per_device_train_batch_size=1, report_to=[], save_strategy="no", disable_tqdm=True,
                             use_cpu=True)
    (plateau,) = cfg.callbacks()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[plateau])
    trainer.train()
    assert trainer.state.global_step == 3
    assert plateau.event["step"] == 3 and abs(plateau.event["values"]["gain"]) < 1e-3
