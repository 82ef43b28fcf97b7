"""RailsConfig: defaults, chain order, YAML/JSON round trip, errors at config time; RewardRails state."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from trl_safeppo import AdaptiveKLController, FixedKLController, RailsConfig, RewardRails
from trl_safeppo.rails.tripwires import TripwireSpec

from .test_base import batch

FULL = {
    "non_finite": {"policy": "group_mean", "value": -1.0},
    "missing_eos": {"penalty": 0.5},
    "length": {"debias": "group", "alpha": 0.5, "budget": 8, "penalty_per_token": 0.01, "overlong_buffer": 4},
    "clip": {"low": -3.0, "high": 3.0, "percentile_low": 1.0, "percentile_high": 99.0, "window": 64},
    "normalize": {"enabled": True},
    "kl": {"controller": "adaptive", "init_kl_coef": 0.1, "target": 2.0, "horizon": 500, "min_coef": 0.01,
           "hold_until_target": True, "deadband": 0.25, "proportional": 1.5},
    "tripwires": [{"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 5.0}}],
}


def test_defaults_only_the_guard_is_on():
    cfg = RailsConfig()
    assert cfg.reward_rail_names() == ["non_finite"]
    assert isinstance(cfg.build_kl_controller(), FixedKLController) and cfg.build_kl_controller().value == 0.0
    assert cfg.build_kl_controller(default_kl_coef=0.04).value == 0.04
    assert cfg.build_tripwires() == [TripwireSpec("non_finite", "stop"), TripwireSpec("reward_timeout", "warn"),
                                     TripwireSpec("silent_reward", "warn")]
    # finite rewards pass through unchanged
    b = batch([0.25, -7.0, 3.0], lengths=[1, 5, 9])
    rewards, metrics = RewardRails()(b)
    assert_close(rewards, b.rewards)
    assert metrics["rails/non_finite/count"] == 0.0
    # a None / NaN reward never comes out: the guard is on by default (value 0.0)
    from trl_safeppo.rails import reward_batch_from_completions

    none_batch = reward_batch_from_completions([None, 1.0], [[1, 0], [0]], eos_token_id=0)
    rewards, metrics = RewardRails()(none_batch)
    assert_close(rewards, torch.tensor([0.0, 1.0]))
    assert metrics["rails/non_finite/count"] == 1.0


def test_chain_order_follows_the_declared_order():
    cfg = RailsConfig.from_dict(FULL)
    assert cfg.reward_rail_names() == [
        "non_finite", "length_debias", "length_power", "missing_eos", "length_linear", "overlong",
        "normalize", "clip", "percentile_clip",
    ]
    before = RailsConfig.from_dict({**FULL, "clip": {**FULL["clip"], "position": "before_norm"}})
    assert before.reward_rail_names()[-3:] == ["clip", "percentile_clip", "normalize"]


def test_yaml_and_json_round_trip():
    cfg = RailsConfig.from_dict(FULL)
    assert RailsConfig.from_yaml(cfg.to_yaml()) == cfg
    assert RailsConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert RailsConfig.from_yaml("") == RailsConfig()
    assert RailsConfig.from_dict(RailsConfig().to_dict()) == RailsConfig()


def test_from_any_reads_a_yaml_file(tmp_path):
    path = tmp_path / "rails.yaml"
    path.write_text("normalize:\n  enabled: true\nkl:\n  controller: adaptive\n  init_kl_coef: 0.2\n")
    cfg = RailsConfig.from_any(str(path))
    assert cfg.normalize.enabled and cfg.kl.controller == "adaptive"
    assert RailsConfig.from_any(None) == RailsConfig() and RailsConfig.from_any(cfg) is cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kl": {"target": -1.0}}, r"rails\.kl\.target must be a finite number > 0, got -1\.0"),
        ({"kl": {"min_coef": 0.0}}, r"rails\.kl\.min_coef must be a finite number > 0"),
        ({"kl": {"horizon": 0}}, r"rails\.kl\.horizon must be a finite number > 0"),
        ({"kl": {"controller": "adaptive", "init_kl_coef": 50.0}}, r"rails\.kl\.init_kl_coef must be in \[min_coef"),
        ({"kl": {"estimator": "k9"}}, r"rails\.kl\.estimator"),
        ({"kl": {"deadband": -0.5}}, r"rails\.kl\.deadband must be a finite number >= 0, got -0\.5"),
        ({"kl": {"proportional": -2}}, r"rails\.kl\.proportional must be a finite number >= 0, got -2"),
        (
            {"kl": {"measure_before_update": "yes"}},
            r"rails\.kl\.measure_before_update must be true or false, got 'yes'",
        ),
        ({"kl": {"hold_until_target": "yes"}}, r"rails\.kl\.hold_until_target must be true or false, got 'yes'"),
        ({"clip": {"low": 2.0, "high": 1.0}}, r"rails\.clip\.low must be <= rails\.clip\.high"),
        ({"clip": {"position": "middle"}}, r"rails\.clip\.position"),
        ({"clip": {"percentile_high": 120}}, r"rails\.clip\.percentile_high must be null or in \[0, 100\]"),
        ({"length": {"alpha": -0.5}}, r"rails\.length\.alpha must be null or a finite number >= 0"),
        ({"length": {"penalty_per_token": 0.1}}, r"needs rails\.length\.budget"),
        ({"length": {"overlong_buffer": 8, "max_completion_length": 4}}, r"rails\.length\.max_completion_length"),
        ({"missing_eos": {"penalty": 1.0, "value": 0.0}}, r"not both"),
        ({"normalize": {"eps": 0}}, r"rails\.normalize\.eps"),
        ({"non_finite": {"policy": "drop"}}, r"rails\.non_finite\.policy"),
        ({"clipp": {}}, r"unknown keys \['clipp'\]; accepted: \['non_finite'"),
        ({"kl": {"beta": 0.1}}, r"rails\.kl: unknown keys \['beta'\]; accepted: \['controller'"),
        ({"tripwires": [{"detector": "kl_limit"}]}, r"missing required params \['limit'\]"),
        ({"tripwires": [{"detector": "nope", "action": "stop"}]}, r"detector must be one of"),
    ],
)
def test_bad_settings_fail_at_config_time(data, message):
    with pytest.raises(ValueError, match=message):
        RailsConfig.from_dict(data)


REPLACEMENT = "hold KL with the adaptive controller (rails.kl.controller: adaptive, with target, proportional and "


@pytest.mark.parametrize(
    ("key", "value", "option"),
    [
        ("max_kl", 0.65, "the KL trust region"),
        ("max_kl_backtracks", 8, "the KL trust region"),
        ("pull_back_above", 0.6, "the KL pull-back"),
        ("pull_back_to", 0.5, "the KL pull-back"),
        ("pull_back_iterations", 10, "the KL pull-back"),
        ("pull_back_on", "new_batch", "the KL pull-back"),
        ("pull_back_redraws", 2, "the KL pull-back"),
        ("measure_exact", True, "the exact KL fed to the controller"),
    ],
)
def test_removed_kl_options_fail_naming_the_field_the_release_and_the_replacement(key, value, option):
    # a rails YAML written for an earlier version, otherwise valid: one error naming the field and its value, the
    # release that removed it and why, and what to use instead
    text = f"kl:\n  controller: adaptive\n  init_kl_coef: 0.04\n  target: 0.5\n  {key}: {json.dumps(value)}\n"
    with pytest.raises(ValueError) as info:
        RailsConfig.from_yaml(text)
    message = str(info.value)
    assert message.startswith(f"rails.kl.{key}={value!r}: {option} was removed in trl_safeppo 0.1.0 (no consistent "
                              "gain in benchmark 5, docs/benchmarks.md); delete it and " + REPLACEMENT)
    assert "unknown keys" not in message


def test_a_rails_dump_written_before_the_removal_still_loads():
    # `RailsConfig.to_dict()` of 0.0.x held every kl field; at their old defaults the removed ones did nothing
    # (max_kl None, backtracks 4, pull_back_above/to None, iterations 6, on trained_batch, measure_exact False)
    old_kl = {"controller": "adaptive", "init_kl_coef": 0.04, "target": 0.5, "max_kl": None, "max_kl_backtracks": 4,
              "pull_back_above": None, "pull_back_to": None, "pull_back_iterations": 6, "pull_back_on": "trained_batch",
              "measure_exact": False}
    loaded = RailsConfig.from_dict({"kl": old_kl})
    assert loaded.kl == RailsConfig.from_dict({"kl": {"controller": "adaptive", "init_kl_coef": 0.04,
                                                      "target": 0.5}}).kl
    # one of them switched on is still refused
    with pytest.raises(ValueError, match=r"rails\.kl\.max_kl=0\.65: the KL trust region was removed"):
        RailsConfig.from_dict({"kl": {**old_kl, "max_kl": 0.65}})


def test_removed_kl_options_of_two_features_fail_in_one_error():
    with pytest.raises(ValueError) as info:
        RailsConfig.from_dict({"kl": {"max_kl": 0.65, "target": 0.5, "measure_exact": True}})
    assert str(info.value).startswith(
        "rails.kl.max_kl=0.65, rails.kl.measure_exact=True: the KL trust region and the exact KL fed to the "
        "controller were removed in trl_safeppo 0.1.0 (no consistent gain in benchmark 5, docs/benchmarks.md); "
        "delete them and " + REPLACEMENT
    )


@pytest.mark.parametrize("where", ["rails", "stages[1] (grpo).rails"])
def test_a_recipe_that_sets_a_removed_kl_option_fails_preflight(where):
    from trl_safeppo.pipeline.preflight import preflight
    from trl_safeppo.pipeline.recipe import RecipeError, recipe_from_dict

    rails = {"kl": {"controller": "adaptive", "init_kl_coef": 0.04, "target": 0.5, "pull_back_above": 0.6}}
    grpo = {"type": "grpo", "dataset": {"path": "task://arithmetic/rl", "n": 8},
            "args": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4}}
    tree = {"name": "old", "model": "tiny://debug", "output_dir": "/tmp/unused", "reward": [{"name": "math"}],
            "stages": [{"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 8}}, grpo]}
    if where == "rails":
        tree["rails"] = rails
    else:
        grpo["rails"] = rails
    with pytest.raises(RecipeError) as info:
        preflight(recipe_from_dict(tree, source="old.yaml"), check_hardware=False)
    assert info.value.where == where
    assert "rails.kl.pull_back_above=0.6: the KL pull-back was removed in trl_safeppo 0.1.0" in str(info.value)


def test_build_kl_controller():
    ctl = RailsConfig.from_dict({"kl": {"controller": "adaptive", "min_coef": 0.01}}).build_kl_controller(0.05)
    assert isinstance(ctl, AdaptiveKLController) and ctl.value == 0.05 and ctl.min_coef == 0.01
    assert not ctl.hold_until_target and ctl.deadband == 0.0  # Ziegler's rule unless asked
    full = RailsConfig.from_dict(FULL).build_kl_controller()
    assert full.hold_until_target and full.deadband == 0.25 and full.proportional == 1.5
    with pytest.raises(ValueError, match="init_kl_coef"):
        RailsConfig.from_dict({"kl": {"controller": "adaptive"}}).build_kl_controller()
    # GRPO's default beta is 0.0: an adaptive controller cannot start there (beta must stay > 0)
    with pytest.raises(ValueError, match=r"the trainer's KL coefficient = 0\.0 must be in \[min_coef, max_coef\]"):
        RailsConfig.from_dict({"kl": {"controller": "adaptive"}}).build_kl_controller(0.0)


def test_reward_rails_state_round_trip_resumes_exactly():
    gen = torch.Generator().manual_seed(5)

    def make():
        n = 8
        return batch(
            torch.randn(n, generator=gen).tolist(),
            lengths=torch.randint(1, 12, (n,), generator=gen).tolist(),
            truncated=(torch.rand(n, generator=gen) < 0.3).tolist(),
            group_ids=(torch.arange(n) // 4).tolist(),
            max_len=12,
        )

    b1, b2 = make(), make()
    a = RewardRails(FULL)
    a(b1)
    a.kl_controller.update(3.0, 8)
    state = json.loads(json.dumps(a.state_dict()))  # plain JSON
    resumed = RewardRails(FULL)
    resumed.load_state_dict(state)
    assert resumed.kl_controller.value == a.kl_controller.value
    ra, ma = a(b2)
    rb, mb = resumed(b2)
    assert_close(ra, rb)
    assert ma == mb
    with pytest.raises(ValueError, match="rails"):
        RewardRails().load_state_dict(state)  # built from a different config


def test_reward_rails_diagnostics():
    # raw rewards [1, 2, 3] grow with length [1, 2, 3]: correlation 1; debiasing leaves [2, 2, 2]: correlation 0
    rails = RewardRails({"length": {"debias": "batch"}})
    rewards, m = rails(batch([1.0, 2.0, 3.0], lengths=[1, 2, 3]))
    assert_close(rewards, torch.tensor([2.0, 2.0, 2.0]))
    assert m["rails/diagnostics/reward_length_corr"] == pytest.approx(1.0)
    assert m["rails/diagnostics/shaped_reward_length_corr"] == 0.0
    assert m["rails/diagnostics/raw_mean"] == pytest.approx(2.0) and rails.n_calls == 1
