"""Every config field the project adds has `metadata["help"]` and is described in its class docstring, as in TRL.

Inherited TRL fields are TRL's business; only fields declared by our own classes are checked. This caught a real
bug once: a docstring written as `\"\"\"...\"\"\".format(...)` is an expression, not a docstring, so `__doc__` silently
fell back to dataclasses' generated signature.
"""

import dataclasses
import importlib

import pytest

CONFIGS = [
    ("trl_safeppo.trainers.ppo_config", "SafePPOConfig"),
    ("trl_safeppo.trainers.grpo_config", "SafeGRPOConfig"),
    ("trl_safeppo.trainers.dpo_config", "SafeDPOConfig"),
    ("trl_safeppo.trainers.tripwires", "TripwireFields"),
    ("trl_safeppo.trainers.tripwires", "RewardTimeoutFields"),
    ("trl_safeppo.rejection_sampling", "RejectionSamplingConfig"),
    ("trl_safeppo.rails.config", "RailsConfig"),
    ("trl_safeppo.rails.config", "NonFiniteConfig"),
    ("trl_safeppo.rails.config", "MissingEOSConfig"),
    ("trl_safeppo.rails.config", "LengthConfig"),
    ("trl_safeppo.rails.config", "ClipConfig"),
    ("trl_safeppo.rails.config", "NormalizeConfig"),
    ("trl_safeppo.rails.config", "KLConfig"),
    ("trl_safeppo.monitoring.gates", "GateConfig"),
    ("trl_safeppo.pipeline.recipe", "StageSpec"),
    ("trl_safeppo.pipeline.recipe", "Recipe"),
]


def _own_fields(cls):
    inherited = set()
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            inherited |= {f.name for f in dataclasses.fields(base)}
    return [f for f in dataclasses.fields(cls) if f.name not in inherited and not f.name.startswith("_")]


@pytest.mark.parametrize("module,name", CONFIGS, ids=[n for _, n in CONFIGS])
def test_config_fields_have_help_and_are_documented(module, name):
    cls = getattr(importlib.import_module(module), name)
    doc = cls.__doc__ or ""
    assert not doc.startswith(f"{name}("), f"{name}.__doc__ is dataclasses' generated signature, not a docstring"
    fields = _own_fields(cls)
    assert fields, f"{name} declares no fields of its own"
    missing_help = [f.name for f in fields if not f.metadata.get("help")]
    assert not missing_help, f"{name}: fields without metadata help: {missing_help}"
    undocumented = [f.name for f in fields if f.name not in doc]
    assert not undocumented, f"{name}: fields not described in the class docstring: {undocumented}"
