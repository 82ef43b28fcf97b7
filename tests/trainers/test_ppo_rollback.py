"""A tripwire rollback restores PPO's critic with the policy (trainers.tripwires snapshot hook)."""

from __future__ import annotations

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
