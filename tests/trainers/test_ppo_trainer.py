"""SafePPOTrainer on tiny://debug: trains end to end, the loss is PPO's, checkpoints resume the run, bad input fails
early with one clear error. Tiny lengths and 2-3 steps: the slow reward-goes-up test is in test_ppo_integration.py."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from datasets import Dataset

from trl_safeppo.trainers.ppo_config import SafePPOConfig
from trl_safeppo.trainers.ppo_trainer import CRITIC_DIR, CRITIC_OPTIMIZER_FILE, SafePPOTrainer


class LengthReward:
    """Picklable rule: completion length / 8 (so every completion is scored)."""

    __name__ = "length_reward"

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        return [len(ids) / 8.0 for ids in completion_ids]


class SometimesNone:
    """Returns None for every other completion and NaN for every third: unscorable rows must be handled."""

    __name__ = "sometimes_none"

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        out = []
        for i in range(len(prompts)):
            out.append(None if i % 2 == 0 else (math.nan if i % 3 == 0 else 1.0))
        return out


def prompts(n: int = 16) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(n)]})


def config(tmp_path, **overrides) -> SafePPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=6, max_steps=2,
        logging_steps=1, report_to=[], bf16=False, use_cpu=True, learning_rate=1e-3, num_iterations=1,
        steps_per_generation=1, save_strategy="no", gradient_checkpointing=False, seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return SafePPOConfig(**kwargs)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def changed(before: dict, module: torch.nn.Module) -> bool:
    now = dict(module.named_parameters())
    return any(not torch.equal(before[n], now[n].detach()) for n in before)


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


# ------------------------------------------------------------------------------------------------ training
def test_trains_policy_and_critic_and_logs_ppo_metrics(tmp_path, tiny_debug_path):
    args = config(tmp_path, num_iterations=2, steps_per_generation=2, max_steps=3)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    policy_before, critic_before = params(trainer.model), params(trainer.critic)
    trainer.train()
    assert changed(policy_before, trainer.model), "the policy did not move"
    assert changed(critic_before, trainer.critic), "the critic did not move"
    keys = set().union(*trainer.state.log_history)
    for key in [
        "reward", "reward_std", "rewards/length_reward/mean", "kl", "beta", "entropy", "completions/mean_length",
        "completions/min_length", "completions/max_length", "completions/clipped_ratio", "ppo/score/mean",
        "ppo/score/std", "ppo/kl_seq", "ppo/non_score_reward", "ppo/rlhf_reward", "ppo/val/loss", "ppo/val/clipfrac",
        "ppo/val/explained_variance", "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/val/grad_norm",
        "ppo/unscorable",
    ]:
        assert key in keys, f"metric {key} was not logged"
    # first rollout: the policy is the reference, so the KL is 0 and the non-score reward too
    assert logged(trainer, "kl")[0] == pytest.approx(0.0, abs=1e-6)
    assert logged(trainer, "beta")[0] == pytest.approx(0.05)
    # the second and third optimizer steps reuse the rollout (2 minibatches x 2 epochs): the ratio moved off 1
    assert max(logged(trainer, "ppo/policy/approxkl")) > 0


def test_several_generations_per_prompt_with_eval_gradient_checkpointing_and_entropy_bonus(tmp_path, tiny_debug_path):
    args = config(
        tmp_path, num_generations=2, per_device_train_batch_size=4, gradient_checkpointing=True,
        eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4, entropy_coef=0.01,
    )
    trainer = SafePPOTrainer(
        model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts(), eval_dataset=prompts(4)
    )
    trainer.train()
    assert len(logged(trainer, "ppo/val/loss")) == 2
    assert len(logged(trainer, "eval_ppo/val/loss")) == 1 and len(logged(trainer, "eval_kl")) == 1
    assert trainer.rails_wiring.kl_controller.n_updates == 2  # evaluation never moves the KL controller
    assert logged(trainer, "entropy_coef") == [0.01, 0.01]  # GRPO's entropy bonus is active in the PPO loss


def test_every_logged_metric_is_documented(tmp_path, tiny_debug_path):
    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "metrics.md")).read()
    args = config(tmp_path, rails={"normalize": {"enabled": True}}, max_steps=1)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    trainer.train()
    ours = {k for h in trainer.state.log_history for k in h if k.startswith("ppo/") or k in ("kl", "beta")}
    missing = sorted(k for k in ours if f"`{k}`" not in docs)
    assert not missing, f"metrics logged by SafePPOTrainer but not in docs/metrics.md: {missing}"


def test_every_epoch_draws_new_minibatches(tmp_path, tiny_debug_path):
    # rollout of 8 completions, 2 minibatches of 4, 2 epochs: 4 optimizer steps on one rollout
    args = config(tmp_path, per_device_train_batch_size=4, steps_per_generation=2, num_iterations=2, max_steps=4,
                  max_completion_length=8)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    seen = []
    original = trainer._compute_loss

    def recording(model, inputs):
        seen.append(frozenset(tuple(row.tolist()) for row in torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)))
        return original(model, inputs)

    trainer._compute_loss = recording
    trainer.train()
    assert len(seen) == 4
    assert seen[0] | seen[1] == seen[2] | seen[3]  # the same rollout in both epochs ...
    assert {seen[0], seen[1]} != {seen[2], seen[3]}  # ... cut into different minibatches (seeded, so deterministic)


def test_policy_loss_is_the_clipped_surrogate_without_kl(tmp_path, tiny_debug_path):
    """Feed GRPO's loss (B, T) advantages and hand-set ratios; the KL must stay out of the loss."""
    trainer = SafePPOTrainer(
        model="tiny://debug", reward_funcs=LengthReward(), args=config(tmp_path), train_dataset=prompts()
    )
    tok = trainer.processing_class
    prompt_ids = torch.tensor([tok("hello there")["input_ids"]] * 2)
    completion_ids = torch.tensor([tok(" the answer is")["input_ids"][:3]] * 2)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    ones_p, ones_c = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
    trainer.model.train()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, torch.ones_like(input_ids), 3)
        values = trainer._critic_values(input_ids, torch.ones_like(input_ids), 3)
    # ratio = pi / pi_old: row 0 -> e^{ln 1.5} = 1.5, clipped to 1 + 0.2 = 1.2 with A = +1: term min(1.5, 1.2) = 1.2
    #                       row 1 -> 0.5 with A = +1: min(0.5, clip(0.5) = 0.8) = 0.5
    # bnpo loss = -mean over the 6 tokens = -(3 * 1.2 + 3 * 0.5) / 6 = -0.85; value loss is 0 (vpred = old = returns)
    old = torch.stack([logps[0] - math.log(1.5), logps[1] - math.log(0.5)])
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": ones_p, "completion_ids": completion_ids, "completion_mask": ones_c,
        "advantages": torch.ones(2, 3), "old_per_token_logps": old, "num_items_in_batch": torch.tensor(6.0),
        "ref_per_token_logps": logps - 5.0,  # a huge KL that must not enter the loss
        "ppo_values": values, "ppo_returns": values, "ppo_mask": torch.ones(2, 3),
    }
    trainer.state.global_step = 0
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    loss = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(loss, torch.tensor(-0.85), atol=1e-4, rtol=0)
    assert trainer.beta == pytest.approx(0.05), "beta must be restored after the loss"


def test_critic_warmup_keeps_the_policy_still(tmp_path, tiny_debug_path):
    args = config(tmp_path, critic_warmup_steps=2, max_steps=2)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    policy_before, critic_before = params(trainer.model), params(trainer.critic)
    trainer.train()
    assert not changed(policy_before, trainer.model)
    assert changed(critic_before, trainer.critic)
    assert logged(trainer, "ppo/policy_trained") == [0.0, 0.0]


def test_unscorable_completions_are_counted_not_fatal(tmp_path, tiny_debug_path):
    args = config(tmp_path)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=SometimesNone(), args=args, train_dataset=prompts())
    trainer.train()
    # per rollout of 4: i = 0, 2 -> None; i = 3 -> NaN; i = 1 -> 1.0: 3 unscorable
    assert logged(trainer, "ppo/unscorable") == [3.0, 3.0]
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_empty_batch_after_masking_is_counted_not_fatal(tmp_path, tiny_debug_path):
    # max_completion_length=2 truncates every completion and mask_truncated_completions masks all of them out:
    # the rollout has no token to learn from
    args = config(tmp_path, max_completion_length=2, mask_truncated_completions=True)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    policy_before = params(trainer.model)
    trainer.train()
    assert logged(trainer, "ppo/empty_completions") == [4.0, 4.0]
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
    assert not changed(policy_before, trainer.model)


def test_peft_reference_is_the_base_model(tmp_path, tiny_debug_path):
    from peft import LoraConfig

    args = config(tmp_path)
    trainer = SafePPOTrainer(
        model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None  # GRPO disables the adapters for the reference
    trainer.train()
    assert len(logged(trainer, "kl")) == 2


def test_reward_model_and_rule_mixed_and_critic_from_reward_model(tmp_path, tiny_debug_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = str(tmp_path / "rm")
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_debug_path, num_labels=1)
    torch.nn.init.constant_(rm.score.weight, 0.01)
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_debug_path).save_pretrained(rm_dir)
    args = config(tmp_path, critic_model_path="reward_model", max_steps=1)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=[rm_dir, LengthReward()], args=args, train_dataset=prompts())
    head = trainer.accelerator.unwrap_model(trainer.critic).model.score
    torch.testing.assert_close(head.weight, torch.full_like(head.weight, 0.01))  # starts as the reward model
    trainer.train()
    assert "rewards/length_reward/mean" in trainer.state.log_history[0]


def test_raise_kl_tripwire_acts_on_the_kl_controller(tmp_path, tiny_debug_path):
    # kl_limit watching `beta` with limit 0.01 trips at every log (beta >= 0.05): raise_kl doubles beta each time.
    trip = {"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 0.01, "key": "beta"}}
    args = config(tmp_path, tripwires=[trip], tripwire_raise_kl_factor=2.0)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    trainer.train()
    # rollout 1 used 0.05, the trip after step 1 made it 0.1 for rollout 2, the trip after step 2 made it 0.2
    assert logged(trainer, "beta") == pytest.approx([0.05, 0.1])
    assert trainer.rails_wiring.kl_controller.value == pytest.approx(0.2)
    assert trainer.beta == pytest.approx(0.2)
    assert os.path.exists(os.path.join(args.output_dir, "tripwires.jsonl"))


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_holds_critic_optimizers_kl_and_normalizer_and_resume_restores_them(
        tmp_path, tiny_debug_path, monkeypatch):
    from trl_safeppo import fileio
    from trl_safeppo.trainers import rails_mixin

    at_marker = {}  # what the checkpoint folder holds when the marker is written (it must be written last)
    write_json = fileio.write_json

    def spy_write_json(path, obj, **kwargs):
        if os.path.basename(path) == rails_mixin.STATE_MARKER:
            at_marker[os.path.basename(os.path.dirname(path))] = sorted(os.listdir(os.path.dirname(path)))
        return write_json(path, obj, **kwargs)

    monkeypatch.setattr(rails_mixin.fileio, "write_json", spy_write_json)
    rails = {"kl": {"controller": "adaptive", "target": 0.01, "horizon": 10, "min_coef": 1e-3}, "normalize": {"enabled": True}}
    args = config(tmp_path, max_steps=3, save_strategy="steps", save_steps=2, rails=rails)
    run = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    run.train()
    ckpt = os.path.join(args.output_dir, "checkpoint-2")
    # the critic and its optimizer are on disk before the marker that says the checkpoint is complete
    assert {CRITIC_DIR, CRITIC_OPTIMIZER_FILE, "optimizer.pt"} <= set(at_marker["checkpoint-2"])
    assert rails_mixin.STATE_MARKER not in at_marker["checkpoint-2"]
    for name in (CRITIC_DIR, CRITIC_OPTIMIZER_FILE, "optimizer.pt", "trl_safeppo_state.json"):
        assert os.path.exists(os.path.join(ckpt, name)), f"{name} missing from the checkpoint"
    with open(os.path.join(ckpt, "trl_safeppo_state.json")) as f:
        saved = json.load(f)["rails"]
    betas = logged(run, "beta")  # beta used by rollouts 1, 2, 3 (the controller moves it after each)
    assert betas[1] != betas[0], "the adaptive controller did not move beta"

    # Resume from step 2 to step 3; a callback records what was loaded before the first resumed step.
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    seen = {}

    class AtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["kl"] = resumed.rails_wiring.kl_controller.state_dict()
            seen["beta"] = resumed.beta
            seen["rails"] = resumed.rails_wiring.rails.state_dict()["reward"]
            seen["critic"] = params(resumed.accelerator.unwrap_model(resumed.critic).model)
            seen["critic_opt"] = copy.deepcopy(resumed.critic_optimizer.state_dict()["state"])
            seen["critic_lr"] = [group["lr"] for group in resumed.critic_optimizer.param_groups]

    args2 = config(tmp_path, max_steps=3, rails=rails, output_dir=str(tmp_path / "resumed"))
    resumed = SafePPOTrainer(
        model="tiny://debug", reward_funcs=LengthReward(), args=args2, train_dataset=prompts(), callbacks=[AtTrainBegin()]
    )
    resumed.train(resume_from_checkpoint=ckpt)
    assert seen["kl"] == saved["rails"]["kl"] and seen["kl"]["n_updates"] == 2  # saved once, with the rails
    assert seen["beta"] == pytest.approx(betas[2])  # the beta the third rollout of the original run used
    assert seen["rails"] == saved["rails"]["reward"]  # the running normalizer continues where it was
    assert seen["rails"]["normalize"]["count"] == 8  # 2 rollouts x 4 completions
    on_disk = AutoModelForSequenceClassification.from_pretrained(os.path.join(ckpt, CRITIC_DIR), num_labels=1)
    for name, q in on_disk.named_parameters():
        torch.testing.assert_close(seen["critic"][name], q, msg=f"critic parameter {name} not restored")
    assert seen["critic_opt"] and all(int(s["step"]) == 2 for s in seen["critic_opt"].values())
    # the critic continues at the checkpoint's rate: linear decay over 3 steps, after 2: 1e-3 x (3 - 2) / 3
    assert seen["critic_lr"] == pytest.approx([1e-3 / 3] * len(seen["critic_lr"]))
    # and the run goes on: one more rollout moves the controller and the critic optimizer once more
    assert resumed.rails_wiring.kl_controller.state_dict()["n_updates"] == 3
    assert logged(resumed, "beta")[-1] == pytest.approx(betas[2])

    # a checkpoint whose critic optimizer is in DeepSpeed's format (critic_zero/, no critic_optimizer.pt) resumed
    # without DeepSpeed: one error naming the checkpoint and the fix, before any training
    os.remove(os.path.join(ckpt, CRITIC_OPTIMIZER_FILE))
    again = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), train_dataset=prompts(),
                           args=config(tmp_path, max_steps=3, rails=rails, output_dir=str(tmp_path / "again")))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=.*checkpoint-2' has no critic_optimizer\.pt: it was "
                                         r"written under DeepSpeed.*resume under the launcher that wrote it"):
        again.train(resume_from_checkpoint=ckpt)


def test_kl_measured_before_the_update_sets_the_beta_of_the_same_rollout(tmp_path, tiny_debug_path):
    rails = {"kl": {"controller": "adaptive", "init_kl_coef": 0.1, "target": 1e-3, "horizon": 10, "min_coef": 1e-3,
                    "measure_before_update": True}}
    args = config(tmp_path, rails=rails, max_steps=2)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    trainer.train()
    betas, kls = logged(trainer, "beta"), logged(trainer, "ppo/kl_seq")
    # 4 sequences per rollout, horizon 10 -> n / horizon = 0.4; e = clip(KL / 1e-3 - 1, -0.2, 0.2)
    # rollout 1: KL = 0 (policy == reference) -> beta = 0.1 * (1 - 0.2 * 0.4) = 0.092, already in its own penalty
    # rollout 2: its own KL kls[1]             -> beta = 0.092 * (1 + 0.4 * e)
    assert kls[0] == 0.0
    e = min(max(kls[1] / 1e-3 - 1, -0.2), 0.2)
    assert betas == pytest.approx([0.092, 0.092 * (1 + 0.4 * e)])
    assert trainer.rails_wiring.kl_controller.n_updates == 2


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"loss_type": "cispo"}, "loss_type"),
        ({"num_generations": 0}, "num_generations"),
        ({"gamma": 1.5}, "gamma"),
        ({"lam": -0.1}, "lam"),
        ({"cliprange_value": 0.0}, "cliprange_value"),
        ({"vf_coef": 0.0}, "vf_coef"),
        ({"critic_warmup_steps": -1}, "critic_warmup_steps"),
        ({"critic_gradient_checkpointing": "yes"}, "critic_gradient_checkpointing"),
        ({"critic_gradient_checkpointing": 1}, "critic_gradient_checkpointing"),  # 1 == True, but not a bool
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"rails": 3}, "rails"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
        ({"steps_per_generation": 3, "gradient_accumulation_steps": 2}, "steps_per_generation"),
        ({"num_generations": 3, "per_device_train_batch_size": 4}, "num_generations"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        config(tmp_path, **overrides)


def test_config_accepts_one_generation_and_odd_batches(tmp_path):
    args = config(tmp_path, num_generations=1, per_device_train_batch_size=3)
    assert args.num_generations == 1 and args.generation_batch_size == 3


def test_config_defaults_work_without_a_bf16_accelerator(tmp_path):
    import torch

    args = SafePPOConfig(output_dir=str(tmp_path / "defaults"))
    assert args.num_generations == 1 and args.num_iterations == 4 and args.beta == 0.05
    if not torch.cuda.is_available():
        assert args.bf16 is False


def test_empty_or_too_small_dataset(tmp_path, tiny_debug_path):
    with pytest.raises(ValueError, match="empty"):
        SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=config(tmp_path), train_dataset=prompts(0))
    with pytest.raises(ValueError, match="one rollout needs 4"):
        SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=config(tmp_path), train_dataset=prompts(2))


def test_critic_errors(tmp_path, tiny_debug_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with pytest.raises(ValueError, match="critic_model_path='reward_model'"):
        SafePPOTrainer(
            model="tiny://debug", reward_funcs=LengthReward(), args=config(tmp_path, critic_model_path="reward_model"),
            train_dataset=prompts(),
        )
    with pytest.raises(ValueError, match="critic_model_path"):
        SafePPOTrainer(
            model="tiny://debug", reward_funcs=LengthReward(),
            args=config(tmp_path, critic_model_path=str(tmp_path / "does-not-exist")), train_dataset=prompts(),
        )
    # a critic whose value head does not match its hidden size
    cfg = AutoConfig.from_pretrained(tiny_debug_path, num_labels=1)
    bad = AutoModelForSequenceClassification.from_config(cfg)
    bad.score = torch.nn.Linear(cfg.hidden_size * 2, 1, bias=False)
    with pytest.raises(ValueError, match="hidden size"):
        SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=config(tmp_path), train_dataset=prompts(), value_model=bad)
    # a critic checkpoint whose weights do not match its config (hidden size changed in config.json)
    ckpt = str(tmp_path / "mismatch")
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(ckpt)
    import json

    with open(os.path.join(ckpt, "config.json")) as f:
        data = json.load(f)
    data["hidden_size"] = cfg.hidden_size * 2
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match="critic_model_path"):
        SafePPOTrainer(
            model="tiny://debug", reward_funcs=LengthReward(), args=config(tmp_path, critic_model_path=ckpt),
            train_dataset=prompts(),
        )


def test_policy_object_critic_copies_its_trunk_and_rule_names_resolve(tmp_path, tiny_debug_path):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_debug_path)
    trainer = SafePPOTrainer(model=policy, reward_funcs="format", args=config(tmp_path), train_dataset=prompts())
    critic = trainer.accelerator.unwrap_model(trainer.critic).model
    for name, p in trainer.model.model.named_parameters():
        torch.testing.assert_close(critic.model.get_parameter(name), p, msg=f"critic trunk {name} is not the policy's")
    assert trainer.reward_func_names == ["format"]  # a built-in rule name, resolved by trl_safeppo.rewards


def test_missing_reward_funcs(tmp_path, tiny_debug_path):
    with pytest.raises(ValueError, match="reward_funcs"):
        SafePPOTrainer(model="tiny://debug", reward_funcs=[], args=config(tmp_path), train_dataset=prompts())


def test_critic_optimizer_follows_the_policy_optimizer_settings(tmp_path, tiny_debug_path):
    # optim="adamw_torch" -> torch.optim.AdamW for both; weight decay 0.1 on weights, 0 on biases and norms (the
    # Trainer's split); the critic's own learning rate 0.002 replaces the policy's
    args = config(tmp_path, optim="adamw_torch", weight_decay=0.1, critic_learning_rate=2e-3)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    trainer.create_optimizer()
    critic_opt = trainer.critic_optimizer  # a plain torch optimizer, not registered with accelerate (scaling.py)
    assert type(critic_opt) is type(trainer.optimizer) is torch.optim.AdamW
    decayed, plain = critic_opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {g["lr"] for g in critic_opt.param_groups} == {2e-3}
    critic = trainer.accelerator.unwrap_model(trainer.critic)
    names = {id(p): n for n, p in critic.named_parameters()}
    assert all("norm" in names[id(p)] or "bias" in names[id(p)] for p in plain["params"])
    assert all("norm" not in names[id(p)] for p in decayed["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(critic.parameters()))


@pytest.mark.parametrize(
    "policy, critic, expected",
    [(True, None, True), (False, None, False), (True, False, False), (False, True, True)],
)
def test_critic_gradient_checkpointing_follows_the_policy_unless_set(
    tmp_path, tiny_debug_path, policy, critic, expected
):
    # None follows gradient_checkpointing; True / False set the critic's alone
    args = config(tmp_path, gradient_checkpointing=policy, critic_gradient_checkpointing=critic)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    critic_model = trainer.accelerator.unwrap_model(trainer.critic).model
    # transformers >= 5.23 names it is_activation_checkpointing (the old name warns)
    flag = getattr(type(critic_model), "is_activation_checkpointing", None) and "is_activation_checkpointing"
    assert getattr(critic_model, flag or "is_gradient_checkpointing") is expected
    trainer.train()  # the backward pass runs with and without recomputation
    assert logged(trainer, "ppo/val/loss")


@pytest.mark.skipif(
    not hasattr(__import__("transformers").PreTrainedModel, "activation_checkpointing_enable"),
    reason="activation_checkpointing_enable replaced gradient_checkpointing_enable in transformers 5.23",
)
def test_critic_checkpointing_uses_the_current_transformers_api(tiny_debug_path):
    # on transformers >= 5.23 gradient_checkpointing_enable warns (FutureWarning, removed in v6); the critic uses
    # activation_checkpointing_enable with every_n_layers as its argument, as the transformers Trainer does
    import warnings

    from transformers import AutoModelForSequenceClassification

    from trl_safeppo.models import enable_activation_checkpointing

    model = AutoModelForSequenceClassification.from_pretrained(tiny_debug_path, num_labels=1)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_activation_checkpointing(model, {"use_reentrant": False, "every_n_layers": 2})
        assert model.is_activation_checkpointing
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_optimizer_built_around_one_model_is_refused_for_the_critic(tmp_path, tiny_debug_path, monkeypatch):
    # GaLore / Apollo / LOMO need packages not installed here; their handlers return the parameter groups ("params")
    # or the model ("model") among the kwargs, which is what the guard looks at
    from transformers import Trainer

    def galore_like(args, model=None):
        return torch.optim.AdamW, {"lr": args.learning_rate, "params": list(model.parameters())}

    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(galore_like))
    args = config(tmp_path, optim="adamw_torch")
    with pytest.raises(ValueError, match=r"optim='adamw_torch' builds its optimizer around the policy's own layers"):
        SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
