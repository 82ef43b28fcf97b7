"""SafePPOTrainer under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): the per-token tensors of
both ranks line up with GRPO's slicing, DDP (with gradient accumulation) keeps policy and critic identical on both
ranks, rails and KL state agree."""

from __future__ import annotations

import textwrap

import pytest

SCRIPT = textwrap.dedent(
    '''
    import json, os, sys
    import torch
    from datasets import Dataset
    from trl_safeppo.trainers.ppo_config import SafePPOConfig
    from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer

    class LengthReward:
        __name__ = "length_reward"
        def __call__(self, prompts, completions, completion_ids=None, **kwargs):
            return [len(ids) / 8.0 for ids in completion_ids]

    out = sys.argv[1]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(32)]})
    args = SafePPOConfig(
        output_dir=out, per_device_train_batch_size=2, num_generations=2, max_completion_length=6, max_steps=2,
        num_iterations=2, steps_per_generation=2, gradient_accumulation_steps=2, logging_steps=1, report_to=[], bf16=False, use_cpu=True,
        learning_rate=1e-3, save_strategy="steps", save_steps=2, gradient_checkpointing=False, disable_tqdm=True,
        rails={"kl": {"controller": "adaptive", "target": 0.01, "horizon": 10, "min_coef": 1e-3},
               "normalize": {"enabled": True}},
    )
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=ds)
    trainer.train()
    rank = trainer.accelerator.process_index
    critic = trainer.accelerator.unwrap_model(trainer.critic)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    result = {
        "world": trainer.accelerator.num_processes,
        "policy_sum": float(sum(p.double().sum() for p in policy.parameters())),
        "critic_sum": float(sum(p.double().sum() for p in critic.parameters())),
        "kl_state": trainer.rails_wiring.kl_controller.state_dict(),
        "rails_state": trainer.rails_wiring.rails.state_dict()["reward"],
        "val_loss": [h["ppo/val/loss"] for h in trainer.state.log_history if "ppo/val/loss" in h],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    '''
)


@pytest.mark.distributed
def test_two_processes_on_cpu(two_process_results, tiny_debug_path):
    r0, r1 = two_process_results(SCRIPT)
    assert r0["world"] == r1["world"] == 2
    assert r0["policy_sum"] == pytest.approx(r1["policy_sum"], rel=1e-9), "DDP policies diverged"
    assert r0["critic_sum"] == pytest.approx(r1["critic_sum"], rel=1e-9), "DDP critics diverged"
    assert r0["kl_state"] == r1["kl_state"] and r0["kl_state"]["n_updates"] == 1
    assert r0["rails_state"] == r1["rails_state"]
    # one rollout: 2 per device x 2 processes x steps_per_generation 2 = 8 completions (4 prompts x 2 generations)
    assert r0["rails_state"]["normalize"]["count"] == 8
    assert len(r0["val_loss"]) == 2
    ckpt = two_process_results.out / "checkpoint-2"
    assert (ckpt / "critic").is_dir() and (ckpt / "critic_optimizer.pt").exists()
