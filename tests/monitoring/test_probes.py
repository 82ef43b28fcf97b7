"""Probe prompts (trl_safeppo/monitoring/probes.py) and the greedy generation under them."""

from __future__ import annotations

import pytest

from trl_safeppo.monitoring.probes import run_probes, validate_probes


@pytest.mark.parametrize(
    "probes, fragment",
    [
        ([], "probes: the list is empty"),
        ("What is 2 + 2?", "probes: expected a non-empty list of prompt strings, got str"),
        (None, "probes: expected a non-empty list of prompt strings, got NoneType"),
        (["ok", 3], r"probes\[1\]: expected a prompt string, got int 3"),
        (["ok", {"role": "user"}], r"probes\[1\]: expected a prompt string, got dict"),
        (["  "], r"probes\[0\]: the prompt is blank"),
    ],
)
def test_bad_probe_lists_are_one_clear_error(probes, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_probes(probes)


def test_run_probes_is_greedy_and_keeps_order(tiny_debug_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["What is 2 + 2?", "Write a poem about the sea.", "What is 2 + 2?"]
    model = AutoModelForCausalLM.from_pretrained(tiny_debug_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_debug_path)
    side = tokenizer.padding_side
    first = run_probes(model, prompts, max_new_tokens=6, tokenizer=tokenizer, batch_size=2)
    again = run_probes(tiny_debug_path, prompts, max_new_tokens=6, batch_size=3)  # by path, other batching
    assert [p["prompt"] for p in first] == prompts
    assert [p["completion"] for p in first] == [p["completion"] for p in again]  # greedy: same answers
    assert first[0]["completion"] == first[2]["completion"]  # same prompt, same answer, despite left padding
    for p in first:
        assert 1 <= p["length"] <= 6
        assert not p["truncated"] or p["length"] == 6  # truncated means it ran to max_new_tokens
    assert tokenizer.padding_side == side  # generation pads left, then restores the caller's setting
