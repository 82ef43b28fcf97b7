"""What a failed gate does (`on_fail`) and which model is the run's final one (`final`): the pure decision logic of
trl_safeppo/monitoring/gates.py that the runner applies (tests/pipeline/test_gate_handoff.py runs it end to end)."""

from __future__ import annotations

import pytest

from trl_safeppo.monitoring.gates import GateConfig, GateOutcome, evaluate_gates, gate_decision, select_final


def test_on_fail_defaults_to_stop_and_unknown_values_name_the_accepted_ones():
    assert GateConfig().on_fail == "stop"
    assert GateConfig.from_dict({"on_fail": "carry_previous"}).on_fail == "carry_previous"
    with pytest.raises(ValueError, match=r"gates.on_fail: unknown value 'carry'; accepted values: stop, carry_previous"):
        GateConfig.from_dict({"on_fail": "carry"})


def test_a_heldout_regression_is_stopped_or_carried_as_the_gate_says():
    # accuracy 0.60 -> 0.10: a drop of 0.50 > 0.05, so the heldout_drop gate fails
    outcomes = evaluate_gates(GateConfig(max_heldout_drop=0.05), eval_metrics={"accuracy": 0.10},
                              previous_eval={"accuracy": 0.60})
    assert [(o.gate, o.passed) for o in outcomes] == [("heldout_drop", False), ("no_tripwire_stop", True)]
    assert gate_decision("stop", outcomes) == "stop"
    assert gate_decision("carry_previous", outcomes) == "carry_previous"
    assert gate_decision("carry_previous", [o.to_dict() for o in outcomes]) == "carry_previous"  # gates.json form
    # 0.60 -> 0.58: a drop of 0.02 <= 0.05 passes, whatever on_fail says
    kept = evaluate_gates(GateConfig(max_heldout_drop=0.05), eval_metrics={"accuracy": 0.58},
                          previous_eval={"accuracy": 0.60})
    assert gate_decision("carry_previous", kept) == gate_decision("stop", kept) == "passed"
    assert gate_decision("stop", []) == "passed"
    with pytest.raises(ValueError, match="accepted values: stop, carry_previous"):
        gate_decision("ignore", [GateOutcome("x", False, "")])


def _candidates(*accuracies):
    return [{"stage": f"0{i + 1}-s", "eval": None if a is None else {"accuracy": a}} for i, a in enumerate(accuracies)]


def test_select_final_best_heldout_and_last():
    c = _candidates(0.40, 0.70, 0.55)
    assert select_final(c, "last")["stage"] == "03-s"
    assert select_final(c, "best_heldout")["stage"] == "02-s"  # 0.70 > 0.55 > 0.40
    # a tie goes to the later model (more training, no held-out cost)
    assert select_final(_candidates(0.70, 0.70, 0.10), "best_heldout")["stage"] == "02-s"
    # a model without a held-out score is not chosen by score; with no score at all, the last one is kept
    assert select_final(_candidates(0.30, None), "best_heldout")["stage"] == "01-s"
    assert select_final(_candidates(None, None), "best_heldout")["stage"] == "02-s"
    assert select_final([], "best_heldout") is None
    with pytest.raises(ValueError, match=r"final: unknown value 'best'; accepted values: last, best_heldout"):
        select_final(c, "best")
