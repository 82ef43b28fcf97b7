"""SafeGRPOTrainer on tiny://debug: rails off == GRPOTrainer, rails act before GRPO's group normalization, adaptive
beta follows Ziegler's rule, rail state survives a checkpoint, bad configurations fail with the field named."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl_safeppo import SafeGRPOConfig, SafeGRPOTrainer  # noqa: E402
from trl_safeppo.trainers.rails_mixin import STATE_MARKER  # noqa: E402


class CharLength:
    """Reward = completion length in characters (deterministic, picklable, stable name)."""

    __name__ = "char_length"

    def __call__(self, prompts, completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]


def _dataset(n=16):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(n)]})


COMMON = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    logging_steps=1,
    learning_rate=1e-2,
    seed=0,
    report_to="none",
    use_cpu=True,
)


def _train(trainer_cls, config_cls, model, tmp_path, max_steps=3, **overrides):
    args = config_cls(output_dir=str(tmp_path), max_steps=max_steps, save_strategy="no", **{**COMMON, **overrides})
    trainer = trainer_cls(model=model, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def test_rails_off_trains_exactly_like_grpo(tmp_path, tiny_debug_path):
    _, plain = _train(GRPOTrainer, GRPOConfig, tiny_debug_path, tmp_path / "plain", beta=0.1)
    safe, railed = _train(SafeGRPOTrainer, SafeGRPOConfig, "tiny://debug", tmp_path / "safe", beta=0.1)
    keys = ("loss", "reward", "kl", "entropy", "completions/mean_length", "grad_norm")
    assert [{k: h[k] for k in keys} for h in railed] == [{k: h[k] for k in keys} for h in plain]
    assert plain[-1]["kl"] > 0  # the comparison covers a moving policy, not three identical zeros
    assert safe.tripwire_callback is None and safe.rails_wiring.rails is None
    assert safe.reward_func_names == ["char_length"]


def test_rewards_named_as_in_a_recipe_are_resolved_as_for_ppo(tmp_path):
    # a built-in rule name and a rule spec become the rule checkers (GRPOTrainer alone would read "math" as a Hub id)
    from trl_safeppo.rewards.checker import RuleChecker

    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=1, save_strategy="no", **COMMON)
    trainer = SafeGRPOTrainer("tiny://debug", reward_funcs=["math", {"name": "format"}], args=args,
                              train_dataset=_dataset())
    # each timed in a worker process (reward_timeout_s defaults to 60 s): the wrapped function is the rule checker
    assert [type(f.func) for f in trainer.reward_funcs[:2]] == [RuleChecker, RuleChecker]
    assert trainer.reward_func_names[:2] == ["math", "format"]
    with pytest.raises(ValueError, match=r"reward_funcs=\[\]: pass a callable rule checker"):
        SafeGRPOTrainer("tiny://debug", reward_funcs=[], args=args, train_dataset=_dataset())
    with pytest.raises(ValueError, match=r"reward_funcs\[1\]=.*no-such-rm' does not exist"):  # a missing reward model
        SafeGRPOTrainer("tiny://debug", reward_funcs=["math", str(tmp_path / "no-such-rm")], args=args,
                        train_dataset=_dataset())


def test_length_rail_shapes_the_reward_grpo_normalizes(tmp_path, tiny_debug_path):
    rails = {"length": {"budget": 2, "penalty_per_token": 5.0}}
    trainer, logs = _train(SafeGRPOTrainer, SafeGRPOConfig, tiny_debug_path, tmp_path, max_steps=1, rails=rails)
    wiring = trainer.rails_wiring
    batch = wiring.rewards.last_batch
    # length_linear: r' = r - 5 * max(0, len - 2)
    expected = batch.rewards - 5.0 * (batch.lengths - 2).clamp(min=0).float()
    torch.testing.assert_close(wiring.rewards.last_rewards.cpu(), expected)
    assert trainer.reward_func_names == ["char_length", "rails_adjustment"]
    log = logs[0]
    # GRPO's `reward` is the railed reward; the per-function metric keeps the raw score; the adjustment column
    # carries the difference.
    assert log["reward"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert log["rewards/char_length/mean"] == pytest.approx(batch.rewards.mean().item(), rel=1e-5)
    assert log["rewards/rails_adjustment/mean"] == pytest.approx((expected - batch.rewards).mean().item(), rel=1e-5)
    assert log["rails/length_linear/over_budget_rate"] == pytest.approx((batch.lengths > 2).float().mean().item())
    assert "tripwire/non_finite" in log  # the rails block's default tripwire (non_finite -> stop) is on


@pytest.mark.parametrize(
    ("rails", "expected"),
    [
        # fixed clip after (no) normalization: r' = clamp(r, 15, 18)
        ({"clip": {"low": 15.0, "high": 18.0}}, lambda b: b.rewards.clamp(15.0, 18.0)),
        # missing EOS: a completion cut at max_completion_length without EOS loses 3 points
        ({"missing_eos": {"penalty": 3.0}}, lambda b: b.rewards - 3.0 * b.truncated.float()),
    ],
)
def test_other_reward_rails_act_before_normalization(tmp_path, tiny_debug_path, rails, expected):
    trainer, logs = _train(SafeGRPOTrainer, SafeGRPOConfig, tiny_debug_path, tmp_path, max_steps=1, rails=rails)
    batch = trainer.rails_wiring.rewards.last_batch
    torch.testing.assert_close(trainer.rails_wiring.rewards.last_rewards.cpu(), expected(batch))
    assert not torch.equal(expected(batch), batch.rewards)  # the rail changed something on this batch
    assert logs[0]["reward"] == pytest.approx(expected(batch).mean().item(), rel=1e-5)


def test_non_finite_reward_is_guarded(tmp_path, tiny_debug_path):
    class SometimesNaN:
        __name__ = "sometimes_nan"

        def __call__(self, prompts, completions, **kwargs):
            return [float("nan") if i % 4 == 0 else 1.0 + i for i in range(len(completions))]

    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=1, save_strategy="no", rails={}, **COMMON)
    trainer = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=SometimesNaN(), args=args, train_dataset=_dataset())
    trainer.train()
    log = trainer.state.log_history[0]
    # 4 completions per process batch, row 0 of each is NaN -> 1 replaced by 0.0 (guard policy "value")
    assert log["rails/non_finite/count"] == 1.0
    torch.testing.assert_close(trainer.rails_wiring.rewards.last_rewards.cpu(), torch.tensor([0.0, 2.0, 3.0, 4.0]))
    assert log["loss"] == log["loss"]  # finite, not NaN


def test_adaptive_beta_follows_ziegler_and_survives_a_checkpoint(tmp_path, tiny_debug_path):
    rails = {"kl": {"controller": "adaptive", "init_kl_coef": 0.1, "target": 1e-3, "horizon": 10, "min_coef": 1e-3}}
    args = SafeGRPOConfig(
        output_dir=str(tmp_path), max_steps=3, save_strategy="steps", save_steps=2, rails=rails, **COMMON
    )
    trainer = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    assert trainer.ref_model is not None and trainer.beta == 0.1  # init_kl_coef replaces GRPO's beta=0
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    betas = [h["beta"] for h in logs]
    # n_steps = 4 completions per step, horizon 10; e = clip(kl/target - 1, -0.2, 0.2)
    # step 1: kl = 0 (policy == reference)       -> e = -0.2, beta = 0.1 * (1 - 0.2 * 0.4) = 0.092
    # step 2: kl = logs[1]["kl"] >> 1e-3          -> e = +0.2, beta = 0.092 * (1 + 0.2 * 0.4) = 0.09936
    assert logs[0]["kl"] == 0.0 and logs[1]["kl"] > 2e-3
    assert betas == pytest.approx([0.1, 0.092, 0.09936])

    marker = os.path.join(tmp_path, "checkpoint-2", STATE_MARKER)
    with open(marker) as f:
        saved = json.load(f)
    state = saved["rails"]
    # the controller is saved once, inside the rails' state; beta is its value, not stored apart
    assert saved["version"] == 3 and state["version"] == 2 and state["kl"] is None and "beta" not in state
    assert state["rails"]["kl"]["value"] == pytest.approx(0.09936) and state["rails"]["kl"]["n_updates"] == 2

    resumed = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    assert resumed.beta == 0.1
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-2"))
    step3 = [h for h in resumed.state.log_history if h.get("step") == 3 and "loss" in h][0]
    assert step3["beta"] == pytest.approx(0.09936)  # continued from the checkpoint, not from init_kl_coef

    # a checkpoint written before the controller had one owner (its own safe_rails_state.pt beside a marker without
    # state; version 1: the controller inside "rails", again as "kl", and "beta" apart) still resumes; here its
    # controller stands at 0.05
    old_kl = {**state["rails"]["kl"], "value": 0.05, "base": 0.05}
    torch.save({"version": 1, "rails": {**state["rails"], "kl": old_kl}, "kl": old_kl, "beta": 0.05},
               os.path.join(tmp_path, "checkpoint-2", "safe_rails_state.pt"))
    with open(marker, "w") as f:
        json.dump({"global_step": 2, "complete": True}, f)
    old = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    old.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-2"))
    step3 = [h for h in old.state.log_history if h.get("step") == 3 and "loss" in h][0]
    assert step3["beta"] == pytest.approx(0.05) and old.rails_wiring.kl_controller.n_updates == 3


def test_kl_measured_before_the_update_sets_the_beta_of_the_same_step(tmp_path, tiny_debug_path):
    rails = {"kl": {"controller": "adaptive", "init_kl_coef": 0.1, "target": 1e-3, "horizon": 10, "min_coef": 1e-3,
                    "measure_before_update": True}}
    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=3, save_strategy="no", rails=rails, **COMMON)
    trainer = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # the same rule as above (n_steps / horizon = 0.4), but each step's beta comes from that step's own KL:
    # step 1: kl = 0 (policy == reference) -> beta = 0.1 * (1 - 0.2 * 0.4) = 0.092 (above: 0.1 at step 1)
    # step 2: kl = logs[1]["kl"] >> 1e-3    -> beta = 0.092 * 1.08 = 0.09936 (above: at step 3)
    # step 3: kl = logs[2]["kl"] >> 1e-3    -> beta = 0.09936 * 1.08 = 0.1073088
    assert logs[0]["kl"] == 0.0 and min(logs[1]["kl"], logs[2]["kl"]) > 2e-3
    assert [h["beta"] for h in logs] == pytest.approx([0.092, 0.09936, 0.1073088])
    # what the controller measured before the update is the KL GRPO logs for the update on the same batch
    assert trainer.rails_wiring.kl_controller.last_kl == pytest.approx(logs[2]["kl"], rel=1e-5)
    assert trainer.rails_wiring.kl_controller.n_updates == 3  # once per batch, not again at the step's end


def test_kl_before_the_update_costs_one_forward_per_batch_and_none_with_a_fixed_beta(tmp_path, tiny_debug_path):
    adaptive = {"controller": "adaptive", "init_kl_coef": 0.1, "target": 1e-3, "horizon": 10, "min_coef": 1e-3}
    fixed = {"controller": "fixed", "init_kl_coef": 0.1}
    calls = {}
    for name, kl in (("adaptive", adaptive), ("fixed", fixed)):
        for before in (False, True):
            rails = {"kl": {**kl, "measure_before_update": before}}
            args = SafeGRPOConfig(output_dir=str(tmp_path / f"{name}{before}"), max_steps=2, save_strategy="no",
                                  rails=rails, **COMMON)
            trainer = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args,
                                      train_dataset=_dataset())
            forward, count = trainer._get_per_token_logps_and_entropies, []

            def counted(*a, _forward=forward, _count=count, **k):
                _count.append(1)
                return _forward(*a, **k)

            trainer._get_per_token_logps_and_entropies = counted
            trainer.train()
            calls[name, before] = len(count)
    # 2 steps: the measurement adds one policy forward per batch to an adaptive controller, none to a fixed beta
    assert calls["adaptive", True] == calls["adaptive", False] + 2
    assert calls["fixed", True] == calls["fixed", False]


def test_kl_before_the_update_refuses_an_image_batch_naming_the_setting():
    # the extra forward of measure_before_update feeds text only; a vision-language batch is refused before it runs
    from trl_safeppo.trainers.kl_control import policy_logps

    batch = {"pixel_values": torch.zeros(1, 3, 2, 2), "prompt_ids": torch.ones(1, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"rails\.kl\.measure_before_update .* this batch has \['pixel_values'\]"):
        policy_logps(None, batch)


@pytest.mark.parametrize("config", ["grpo", "ppo"])
@pytest.mark.parametrize(
    ("kl", "named"),
    [({"max_kl": 0.65}, "rails.kl.max_kl=0.65: the KL trust region"),
     ({"pull_back_above": 0.6, "pull_back_on": "new_batch"},
      "rails.kl.pull_back_above=0.6, rails.kl.pull_back_on='new_batch': the KL pull-back"),
     ({"measure_before_update": True, "measure_exact": True}, "rails.kl.measure_exact=True: the exact KL")],
)
def test_removed_kl_options_are_refused_by_the_trainer_configs(tmp_path, config, kl, named):
    # the KL trust region, the pull-back and the exact-KL feed were removed (no consistent gain in benchmark 5,
    # docs/benchmarks.md): a config that still sets one fails when it is built, before any model is loaded
    from trl_safeppo import SafePPOConfig

    rails = {"kl": {"controller": "adaptive", "init_kl_coef": 0.1, "target": 0.5, **kl}}
    with pytest.raises(ValueError) as info:
        if config == "grpo":
            SafeGRPOConfig(output_dir=str(tmp_path), rails=rails, **COMMON)
        else:
            SafePPOConfig(output_dir=str(tmp_path), rails=rails, use_cpu=True, report_to="none")
    assert str(info.value).startswith(named)
    assert "removed in trl_safeppo 0.1.0 (no consistent gain in benchmark 5" in str(info.value)
    assert "rails.kl.controller: adaptive" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rails": {"kl": {"controller": "adaptive", "init_kl_coef": 0.1, "min_coef": 0.0}}}, "min_coef"),
        ({"rails": {"clip": {"low": 1.0, "high": 0.0}}}, "rails.clip.low"),
        ({"rails": {"lenght": {}}}, "unknown keys ['lenght']"),
        ({"rails": {"kl": {"estimator": "k1"}}}, "rails.kl.estimator='k1'"),
        ({"rails": {}, "multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
        ({"tripwires": [{"detector": "kl_limit", "action": "panic", "params": {"limit": 1}}]}, "tripwires[0].action"),
    ],
)
def test_bad_configuration_names_the_field(tmp_path, tiny_debug_path, overrides, message):
    # each is refused by SafeGRPOConfig, or at the latest by the trainer
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=1, **{**COMMON, **overrides})
        SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
