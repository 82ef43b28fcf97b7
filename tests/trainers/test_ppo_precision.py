"""SafePPOTrainer's one optimizer step is the same update in fp32, bf16 and fp16 (GradScaler): the loss scale is taken
out of each model's gradient exactly once (trl_safeppo/trainers/scaling.py; issue 20.2).

Each run takes one PPO step with plain SGD and no clipping (`max_grad_norm` huge), so the update of every parameter is
exactly `-lr * g`. The reference `g` is a plain PyTorch backward of the same loss (`compute_loss`) on the same
minibatch (recorded during the step) from the same starting weights, under the run's own autocast (fp32, bf16 or
fp16) but without a loss scale, so any difference is the optimizer path's (unscaling, clipping, stepping). With the
fp16 loss scale S = 1024 taken out twice, the update would be `-lr * g / 1024` (the bug of issue 20); taken out zero
times, `-lr * g * 1024`.

fp16 on a CPU: accelerate makes a GradScaler only on an accelerator, so the test installs one on the CPU
(`torch.amp.GradScaler("cpu", init_scale=1024)`) and switches accelerate's fp16 path on (native AMP, fp16 autocast),
as the issue did to show the bug.
"""

from __future__ import annotations

import pytest
import torch

from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer
from tests.trainers.test_ppo_trainer import LengthReward, config, prompts

LR = 0.5
SCALE = 1024.0


def _flat(named: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for _, t in sorted(named.items())])


def _weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision, rel_tol", [("fp32", 1e-4), ("bf16", 1e-3), ("fp16", 1e-3)])
def test_one_step_update_matches_a_plain_fp32_step(tmp_path, tiny_debug_path, monkeypatch, precision, rel_tol):
    args = config(
        tmp_path, optim="sgd", learning_rate=LR, critic_learning_rate=LR, max_grad_norm=1e9, max_steps=1,
        bf16=precision == "bf16", lr_scheduler_type="constant",
    )
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    accelerator = trainer.accelerator
    if precision == "fp16":
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        monkeypatch.setattr(accelerator, "scaler", scaler)
        monkeypatch.setattr(accelerator, "native_amp", True)
        monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")
    policy = accelerator.unwrap_model(trainer.model)
    critic = accelerator.unwrap_model(trainer.critic)
    policy0, critic0 = _weights(policy), _weights(critic)

    recorded = []
    compute_loss = trainer.compute_loss

    def record(model, inputs, *args, **kwargs):
        recorded.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        return compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", record)
    trainer.train()
    assert len(recorded) == 1
    if precision == "fp16":
        assert scaler.get_scale() == SCALE  # one finite step: no back-off, no growth (growth_interval 2000)
    policy_step = {n: p.detach() - policy0[n] for n, p in policy.named_parameters() if n in policy0}
    critic_step = {n: p.detach() - critic0[n] for n, p in critic.named_parameters() if n in critic0}

    # Reference: the same weights, minibatch and autocast, a plain backward without any loss scale
    monkeypatch.setattr(accelerator, "scaler", None)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n in policy0:
                p.copy_(policy0[n])
        for n, p in critic.named_parameters():
            if n in critic0:
                p.copy_(critic0[n])
    policy.zero_grad(set_to_none=True)
    critic.zero_grad(set_to_none=True)
    trainer.model.train()
    loss = compute_loss(trainer.model, recorded[0])
    loss.backward()
    g_policy, g_critic = _flat(_grads(policy)), _flat(_grads(critic))
    assert g_policy.norm() > 0 and g_critic.norm() > 0

    for name, step, g in [("policy", _flat(policy_step), g_policy), ("critic", _flat(critic_step), g_critic)]:
        expected = -LR * g  # SGD, no clipping, no weight decay, constant learning rate
        error = (step - expected).norm() / expected.norm()
        # a loss scale taken out twice gives error 1 - 1/1024 ~ 1; taken out zero times, ~1023
        assert error < rel_tol, f"{precision}: {name} update is off by {error:.3g} of its size"
    # the logged gradient norms are those of the unscaled gradients
    logged_critic = [h["ppo/val/grad_norm"] for h in trainer.state.log_history if "ppo/val/grad_norm" in h]
    logged_policy = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged_critic[0] == pytest.approx(float(g_critic.norm()), rel=rel_tol)
    assert logged_policy[0] == pytest.approx(float(g_policy.norm()), rel=rel_tol)


def test_fp16_with_float16_weights_is_refused_naming_the_field(tmp_path, tiny_debug_path):
    from transformers import AutoModelForSequenceClassification

    from trl_safeppo.trainers.scaling import check_fp16_master_weights

    critic = AutoModelForSequenceClassification.from_pretrained(tiny_debug_path, num_labels=1)
    check_fp16_master_weights(True, {"value_model": critic})  # float32: fine
    check_fp16_master_weights(False, {"value_model": critic.half()})  # not fp16 training: fine
    with pytest.raises(ValueError, match=r"value_model: fp16=True .* float16 \(model\.embed_tokens\.weight.*bf16=True"):
        check_fp16_master_weights(True, {"value_model": critic})
    critic.requires_grad_(False)  # frozen float16 weights (a reference) are fine
    check_fp16_master_weights(True, {"ref": critic})
