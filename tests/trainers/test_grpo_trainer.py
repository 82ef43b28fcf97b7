"""SafeGRPOTrainer on tiny://debug: rails off == GRPOTrainer, rails act before GRPO's group normalization, adaptive
beta follows Ziegler's rule, rail state survives a checkpoint, bad configurations fail with the field named."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl_safeppo import SafeGRPOConfig, SafeGRPOTrainer  # noqa: E402
from trl_safeppo.trainers.rails_mixin import RAILS_STATE_FILE  # noqa: E402


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

    path = os.path.join(tmp_path, "checkpoint-2", RAILS_STATE_FILE)
    state = torch.load(path, weights_only=False)
    # the controller is saved once, inside the rails' state; beta is its value, not stored apart
    assert state["version"] == 2 and state["kl"] is None and "beta" not in state
    assert state["rails"]["kl"]["value"] == pytest.approx(0.09936) and state["rails"]["kl"]["n_updates"] == 2

    resumed = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    assert resumed.beta == 0.1
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-2"))
    step3 = [h for h in resumed.state.log_history if h.get("step") == 3 and "loss" in h][0]
    assert step3["beta"] == pytest.approx(0.09936)  # continued from the checkpoint, not from init_kl_coef

    # a checkpoint written before the controller had one owner (version 1: the controller inside "rails", again as
    # "kl", and "beta" apart) still resumes; here its controller stands at 0.05
    old_kl = {**state["rails"]["kl"], "value": 0.05, "base": 0.05}
    torch.save({"version": 1, "rails": {**state["rails"], "kl": old_kl}, "kl": old_kl, "beta": 0.05}, path)
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


def test_controller_fed_the_exact_kl_reads_the_whole_vocabulary(tmp_path, tiny_debug_path):
    # rails.kl.measure_exact: the controller's KL is the exact KL of each new batch before the update. The
    # benchmarks' ExactKL subclass computes the same quantity independently (whole-sequence forwards, no
    # logits_to_keep, no chunking) for the same batch and policy: the two must agree.
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from benchmarks._worker import with_exact_kl

    rails = {"kl": {"controller": "adaptive", "init_kl_coef": 0.1, "target": 1e-3, "horizon": 10, "min_coef": 1e-3,
                    "measure_before_update": True, "measure_exact": True}}
    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=3, save_strategy="no", rails=rails,
                          **{**COMMON, "per_device_train_batch_size": 8})
    trainer = with_exact_kl(SafeGRPOTrainer)(model=tiny_debug_path, reward_funcs=CharLength(), args=args,
                                             train_dataset=_dataset())
    seen = []
    update = trainer.rails_wiring.kl_controller.update
    trainer.rails_wiring.kl_controller.update = lambda kl, n: (seen.append(kl), update(kl, n))[1]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert seen[0] == pytest.approx(0.0, abs=1e-6)  # the first batch: policy == reference
    assert seen == pytest.approx([h["kl/exact"] for h in logs], rel=1e-4, abs=1e-7)
    assert seen[-1] > 1e-4
    # it is not the sampled tokens' k3 (what GRPO logs as `kl` for the same batch)
    assert seen[-1] != pytest.approx(logs[-1]["kl"], rel=1e-3)


def _params(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_kl_trust_region_that_never_binds_changes_nothing(tmp_path, tiny_debug_path):
    kl = {"controller": "fixed", "init_kl_coef": 0.1}
    _, plain = _train(SafeGRPOTrainer, SafeGRPOConfig, tiny_debug_path, tmp_path / "plain", rails={"kl": kl})
    capped, logs = _train(SafeGRPOTrainer, SafeGRPOConfig, tiny_debug_path, tmp_path / "capped",
                          rails={"kl": {**kl, "max_kl": 1e9}})
    keys = ("loss", "reward", "kl", "entropy", "completions/mean_length", "grad_norm")
    assert [{k: h[k] for k in keys} for h in logs] == [{k: h[k] for k in keys} for h in plain]
    assert plain[-1]["kl"] > 0
    assert [h["kl/trust_region/scale"] for h in logs] == [1.0, 1.0, 1.0]
    assert [h["kl/trust_region/backtracks"] for h in logs] == [0.0, 0.0, 0.0]
    # the trust region's KL before the step is GRPO's own `kl` of that step (the same batch, the same policy)
    assert [h["kl/trust_region/kl_before"] for h in logs] == pytest.approx([h["kl"] for h in logs], rel=1e-5)
    # and the KL after a step is the next step's starting point: positive once the policy has moved
    assert all(h["kl/trust_region/kl_after"] > 0 for h in logs)
    assert capped.rails_wiring.trust_region.batches == []  # nothing held between steps
    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "metrics.md")).read()
    added = sorted({k for h in logs for k in h if k.startswith("kl/trust_region/")})
    assert len(added) == 4 and all(f"`{k}`" in docs for k in added), added


def test_kl_trust_region_undoes_every_update_that_raises_kl(tmp_path, tiny_debug_path):
    # The policy starts at the reference (KL 0). A cap of 1e-12 with no halvings allowed: any step moves KL off 0,
    # so every update is undone and the policy never leaves the reference: KL stays 0, the weights stay as loaded.
    rails = {"kl": {"controller": "fixed", "init_kl_coef": 0.1, "max_kl": 1e-12, "max_kl_backtracks": 0}}
    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=3, save_strategy="no", rails=rails, **COMMON)
    trainer = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    before = _params(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["kl"] for h in logs] == [0.0, 0.0, 0.0]
    assert [h["kl/trust_region/scale"] for h in logs] == [0.0, 0.0, 0.0]
    assert [h["kl/trust_region/backtracks"] for h in logs] == [1.0, 1.0, 1.0]  # 0 halvings + the undo
    assert all(h["grad_norm"] > 0 for h in logs)  # there were updates to undo
    for p, q in zip(before, _params(trainer.model), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_kl_trust_region_leaves_the_weights_at_the_accepted_fraction_of_the_step(tmp_path, tiny_debug_path,
                                                                                 monkeypatch):
    # A cap the steps of lr 1e-2 exceed (step 1 takes KL from 0 to ~0.02 on this batch): the line search halves.
    # Whatever scale s it accepts, the weights must end at theta_old + s * (theta_new - theta_old).
    import trl_safeppo.rails.kl as kl_module
    from transformers import TrainerCallback

    seen = []
    real = kl_module.kl_line_search

    def spy(kl_at, max_kl, kl_before, max_backtracks):
        new = _params(trainer.model)  # the search starts at the whole step: theta_new
        result = real(kl_at, max_kl, kl_before, max_backtracks)
        seen.append({"new": new, "result": result, "kl_before": kl_before})
        return result

    class Weights(TrainerCallback):  # runs after the trust region (registered later)
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append({"old": _params(trainer.model)})

        def on_optimizer_step(self, args, state, control, **kwargs):
            seen[-1]["final"] = _params(trainer.model)

    monkeypatch.setattr(kl_module, "kl_line_search", spy)
    rails = {"kl": {"controller": "fixed", "init_kl_coef": 0.1, "max_kl": 2e-3, "max_kl_backtracks": 6}}
    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=3, save_strategy="no", rails=rails, **COMMON)
    trainer = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    trainer.add_callback(Weights())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    steps = [{**seen[i], **seen[i + 1]} for i in range(0, len(seen), 2)]
    assert len(steps) == 3
    scales = [step["result"][0] for step in steps]
    assert any(0 < s < 1 for s in scales), scales  # the cap bound and a partial step was taken
    for step, log in zip(steps, logs, strict=True):
        scale, kl_after, _ = step["result"]
        for old, new, final in zip(step["old"], step["new"], step["final"], strict=True):
            torch.testing.assert_close(final, old + scale * (new - old), rtol=0, atol=1e-6)
        assert kl_after <= max(2e-3, step["kl_before"])  # the accepted KL is within the bound
        assert (log["kl/trust_region/scale"], log["kl/trust_region/kl_after"]) == pytest.approx((scale, kl_after))


def test_kl_trust_region_configuration_errors(tmp_path, tiny_debug_path):
    from trl_safeppo import SafePPOConfig

    # no KL term, no reference model: nothing to bound (refused by the config, before any model is built)
    with pytest.raises(ValueError, match=r"rails\.kl\.max_kl=0\.5 bounds the KL .* coefficient is 0\.0"):
        SafeGRPOConfig(output_dir=str(tmp_path), max_steps=1, beta=0.0, rails={"kl": {"max_kl": 0.5}}, **COMMON)
    with pytest.raises(ValueError, match=r"coefficient is 0\.0"):
        SafeGRPOConfig(output_dir=str(tmp_path), beta=0.1, rails={"kl": {"max_kl": 0.5, "init_kl_coef": 0.0}},
                       **COMMON)
    SafeGRPOConfig(output_dir=str(tmp_path), beta=0.0, rails={"kl": {"max_kl": 0.5, "init_kl_coef": 0.1}}, **COMMON)
    # PPO: refused at configuration time, with the alternative named
    with pytest.raises(ValueError, match=r"SafePPOConfig\.rails\.kl\.max_kl=0\.5 is invalid: .*kl_limit"):
        SafePPOConfig(output_dir=str(tmp_path), rails={"kl": {"max_kl": 0.5}}, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"SafePPOConfig\.rails\.kl\.measure_exact=True is invalid: .*GRPO"):
        SafePPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                      rails={"kl": {"measure_exact": True, "measure_before_update": True}})


def _reference_params(trainer):
    reference = dict(trainer.ref_model.named_parameters())
    return [reference[n].detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad]


def test_kl_pull_back_that_never_triggers_changes_nothing(tmp_path, tiny_debug_path):
    kl = {"controller": "fixed", "init_kl_coef": 0.1}
    _, plain = _train(SafeGRPOTrainer, SafeGRPOConfig, tiny_debug_path, tmp_path / "plain", rails={"kl": kl})
    pulled, logs = _train(SafeGRPOTrainer, SafeGRPOConfig, tiny_debug_path, tmp_path / "pulled",
                          rails={"kl": {**kl, "pull_back_above": 1e9}})
    keys = ("loss", "reward", "kl", "entropy", "completions/mean_length", "grad_norm")
    assert [{k: h[k] for k in keys} for h in logs] == [{k: h[k] for k in keys} for h in plain]
    assert plain[-1]["kl"] > 0
    assert [h["kl/pull_back/alpha"] for h in logs] == [1.0, 1.0, 1.0]
    # the KL after each step is the next step's starting point: positive once the policy has moved
    assert all(h["kl/pull_back/kl_after"] > 0 for h in logs)
    assert not any(k.startswith("kl/trust_region/") for h in logs for k in h)  # max_kl is off: not logged
    assert pulled.rails_wiring.trust_region.batches == []  # nothing held between steps
    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "metrics.md")).read()
    added = sorted({k for h in logs for k in h if k.startswith("kl/pull_back/")})
    assert added == ["kl/pull_back/alpha", "kl/pull_back/kl_after"] and all(f"`{k}`" in docs for k in added)


def test_kl_pull_back_to_almost_zero_returns_the_policy_to_the_reference(tmp_path, tiny_debug_path):
    # The policy starts at the reference (KL 0). After each update KL is above 1e-12; landing on 1e-12 needs
    # alpha 0 (at alpha = 2**-6 the KL is still ~2**-12 x the step's, far above 1e-12), so every update ends with
    # the weights back at the reference's: every batch is sampled from the reference, KL 0 at every step.
    rails = {"kl": {"controller": "fixed", "init_kl_coef": 0.1, "pull_back_above": 1e-12}}
    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=3, save_strategy="no", rails=rails, **COMMON)
    trainer = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["kl"] for h in logs] == [0.0, 0.0, 0.0]
    assert [h["kl/pull_back/alpha"] for h in logs] == [0.0, 0.0, 0.0]
    assert all(h["grad_norm"] > 0 for h in logs)  # there were updates to pull back
    for p, q in zip(_reference_params(trainer), _params(trainer.model), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_kl_pull_back_leaves_the_weights_on_the_line_to_the_reference(tmp_path, tiny_debug_path, monkeypatch):
    # lr 1e-2 takes this batch's KL from 0 to ~0.02 in one step: above 2e-3, so the pull-back bisects towards the
    # reference and lands at <= 1e-3. Whatever alpha it accepts, the weights must end at
    # theta_ref + alpha * (theta_new - theta_ref), and the reported KL is the one measured there.
    import trl_safeppo.rails.kl as kl_module
    from transformers import TrainerCallback

    seen = []
    real = kl_module.kl_pull_back_search

    def spy(kl_at, above, to, kl_now, iterations):
        new = _params(trainer.model)  # the search starts at the policy as the update left it: theta_new
        result = real(kl_at, above, to, kl_now, iterations)
        seen[-1].update(new=new, result=result, kl_now=kl_now)
        return result

    class Weights(TrainerCallback):  # runs after the pull-back (registered later)
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append({})

        def on_optimizer_step(self, args, state, control, **kwargs):
            seen[-1]["final"] = _params(trainer.model)

    monkeypatch.setattr(kl_module, "kl_pull_back_search", spy)
    rails = {"kl": {"controller": "fixed", "init_kl_coef": 0.1, "pull_back_above": 2e-3, "pull_back_to": 1e-3,
                    "pull_back_iterations": 8}}
    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=3, save_strategy="no", rails=rails, **COMMON)
    trainer = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
    trainer.add_callback(Weights())
    reference = _reference_params(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    pulled = [step for step in seen if "result" in step]
    assert len(seen) == 3 and pulled, seen  # the search ran on at least one step (it is skipped below the trigger)
    assert any(0 < step["result"][0] < 1 for step in pulled)  # and stopped part of the way back
    for step in pulled:
        alpha, kl_after, _ = step["result"]
        assert step["kl_now"] > 2e-3 and kl_after <= 1e-3
        for ref, new, final in zip(reference, step["new"], step["final"], strict=True):
            torch.testing.assert_close(final, ref + alpha * (new - ref), rtol=0, atol=1e-6)
    assert [h["kl/pull_back/alpha"] for h in logs] == [step["result"][0] if "result" in step else 1.0 for step in seen]
    for step, log in zip(seen, logs, strict=True):
        if "result" in step:
            assert log["kl/pull_back/kl_after"] == pytest.approx(step["result"][1])
            # the reference does not move
    for before, after in zip(reference, _reference_params(trainer), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_removed_new_batch_check_is_refused_naming_its_replacement(tmp_path):
    # `pull_back_on: new_batch` drew a rollout batch again after a pull-back, which needed a snapshot of TRL's private
    # logging state; it was removed (docs/benchmarks.md section 5), and a config that asks for it is told what to use
    with pytest.raises(ValueError, match=r"rails\.kl\.pull_back_on must be 'trained_batch': 'new_batch' .* was removed"
                                         r".*pull_back_to below pull_back_above"):
        SafeGRPOConfig(output_dir=str(tmp_path), beta=0.1, **COMMON,
                       rails={"kl": {"pull_back_above": 0.6, "pull_back_on": "new_batch"}})
    with pytest.raises(ValueError, match=r"rails\.kl\.pull_back_redraws=2: .* was removed; delete pull_back_redraws"):
        SafeGRPOConfig(output_dir=str(tmp_path), beta=0.1, **COMMON,
                       rails={"kl": {"pull_back_above": 0.6, "pull_back_redraws": 2}})
    with pytest.raises(ValueError, match=r"rails\.kl\.pull_back_on must be 'trained_batch', got 'next'"):
        SafeGRPOConfig(output_dir=str(tmp_path), beta=0.1, rails={"kl": {"pull_back_above": 0.6, "pull_back_on": "next"}},
                       **COMMON)


def test_kl_pull_back_configuration_errors(tmp_path, tiny_debug_path):
    from peft import LoraConfig

    from trl_safeppo import SafePPOConfig

    # no KL term, no reference model to pull back to (refused by the config, before any model is built)
    with pytest.raises(ValueError, match=r"rails\.kl\.pull_back_above=0\.6 bounds the KL .* coefficient is 0\.0"):
        SafeGRPOConfig(output_dir=str(tmp_path), beta=0.0, rails={"kl": {"pull_back_above": 0.6}}, **COMMON)
    with pytest.raises(ValueError, match=r"pull_back_above=0\.6 pulls the policy back .* sync_ref_model=True"):
        SafeGRPOConfig(output_dir=str(tmp_path), beta=0.1, sync_ref_model=True, rails={"kl": {"pull_back_above": 0.6}},
                       **COMMON)
    with pytest.raises(ValueError, match=r"SafePPOConfig\.rails\.kl\.pull_back_above=0\.6 is invalid: .*kl_limit"):
        SafePPOConfig(output_dir=str(tmp_path), rails={"kl": {"pull_back_above": 0.6}}, use_cpu=True, report_to="none")
    # PEFT: the reference is the policy with its adapter off, there are no reference weights to move towards
    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=1, beta=0.1, rails={"kl": {"pull_back_above": 0.6}},
                          **COMMON)
    with pytest.raises(ValueError, match=r"pull_back_above=0\.6 moves the weights .* no separate reference model"):
        SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset(),
                        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


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
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=1, **{**COMMON, **overrides})
        SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=CharLength(), args=args, train_dataset=_dataset())
