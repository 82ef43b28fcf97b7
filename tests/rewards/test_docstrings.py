"""The examples in the rules' docstrings (and docs/rewards.md's claims they back) are run as doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "trl_safeppo.rewards.spec",
    "trl_safeppo.rewards.rules.math",
    "trl_safeppo.rewards.rules.format",
    "trl_safeppo.rewards.rules.text",
    "trl_safeppo.rewards.rules.structured",
    "trl_safeppo.rewards.rules.refusal",
    "trl_safeppo.rewards.rules.code",
    "trl_safeppo.rewards.metric",
]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
