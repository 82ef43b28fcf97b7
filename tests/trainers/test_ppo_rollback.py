"""A tripwire rollback restores PPO's critic with the policy (trainers.tripwires snapshot hook)."""

from __future__ import annotations

import pytest
import torch

from trl_safeppo.trainers.tripwires import restore_snapshot, save_snapshot
from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer

from test_ppo_trainer import LengthReward, config, params, prompts  # same directory (pytest prepend mode)


def test_snapshot_restores_critic_weights_and_optimizer_exactly(tmp_path, tiny_debug_path):
    args = config(tmp_path, max_steps=2)
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    trainer.train()  # two steps: the critic has weights and Adam moments of its own
    snapshot_dir = tmp_path / "snap"
    snapshot_dir.mkdir()
    save_snapshot(trainer, str(snapshot_dir))
    critic_at_snapshot = params(trainer.critic)
    adam_step_at_snapshot = {k: v["step"].clone() for k, v in trainer.critic_optimizer.state_dict()["state"].items()}

    # Move the critic and its optimizer past the snapshot, as further training would.
    with torch.no_grad():
        for p in trainer.critic.parameters():
            p.add_(1.0)
    for state in trainer.critic_optimizer.state.values():
        state["step"] += 5

    restore_snapshot(trainer, str(snapshot_dir))
    now = dict(trainer.critic.named_parameters())
    for name, value in critic_at_snapshot.items():
        torch.testing.assert_close(now[name].detach(), value, rtol=0, atol=0)  # exact: the +1.0 is undone
    restored = trainer.critic_optimizer.state_dict()["state"]
    for k, step in adam_step_at_snapshot.items():
        assert torch.equal(restored[k]["step"], step)  # the +5 steps are undone


def test_peft_snapshot_holds_the_adapters_not_the_base_model(tmp_path, tiny_debug_path):
    from peft import LoraConfig

    args = config(tmp_path, max_steps=1)
    trainer = SafePPOTrainer(
        model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    snapshot_dir = tmp_path / "snap"
    snapshot_dir.mkdir()
    path = save_snapshot(trainer, str(snapshot_dir))
    saved = torch.load(path, weights_only=False)["model"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    # exactly the adapters: a lora_A and a lora_B per adapted projection; no base weight, no embedding
    assert len(saved) == len(lora) > 0 and all("lora_" in k for k in saved)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    restore_snapshot(trainer, str(snapshot_dir))
    for n, p in model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p.detach(), lora[n], rtol=0, atol=0)


def test_rollback_scales_the_critics_learning_rate_with_the_policys(tmp_path, tiny_debug_path):
    # kl_limit at 1e-9 on the k3 estimator (>= 0, and 0 only where policy == reference): step 1's KL is 0, step 2's
    # is > 0 after one update -> rollback with the rates x 0.5, to the initial weights (step 1's snapshot is only a
    # candidate until a clean log follows it); step 3's rollout is from the initial policy again (KL 0, clean); step 4
    # trips with the one rollback used -> stop.
    import json

    tripwires = [{"detector": "kl_limit", "action": "rollback", "params": {"limit": 1e-9}}]
    args = config(tmp_path, max_steps=6, tripwires=tripwires, tripwire_max_rollbacks=1, critic_learning_rate=2e-3,
                  kl_estimator="k3")
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    trainer.train()
    with open(tmp_path / "out" / "tripwires.jsonl") as f:
        events = [json.loads(line) for line in f]
    assert [(e["step"], e["action"], bool(e["details"].get("stopped"))) for e in events] == [
        (2, "rollback", False), (4, "rollback", True)]
    # policy 1e-3 and critic 2e-3, each halved once by the rollback (optimizer groups and the schedulers' bases)
    assert trainer.lr_scheduler.base_lrs == pytest.approx([5e-4] * len(trainer.lr_scheduler.base_lrs))
    assert trainer.critic_lr_scheduler.base_lrs == pytest.approx([1e-3] * len(trainer.critic_lr_scheduler.base_lrs))
    # both follow the same linear schedule (6 steps, 4 taken): rate = base x (6 - 4) / 6, so critic / policy stays 2
    assert trainer.state.global_step == 4
    policy_lr = trainer.optimizer.param_groups[0]["lr"]
    assert policy_lr == pytest.approx(5e-4 * 2 / 6)
    assert [g["lr"] for g in trainer.critic_optimizer.param_groups] == pytest.approx([2 * policy_lr] * len(
        trainer.critic_optimizer.param_groups))
