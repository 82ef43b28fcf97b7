"""A resolved reward spec plugs straight into TRL's GRPOTrainer, and its breakdown reaches the trainer's logs."""

from __future__ import annotations

from trl_safeppo.rewards import resolve


def test_grpo_trainer_logs_the_breakdown(tmp_path, tiny_debug_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(4)]
    reward = resolve([{"name": "format", "weight": 0.5, "gate": {"below": 1.0, "value": -1.0}}, {"name": "math"}])
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, max_steps=1, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", log_completions=True)
    trainer = GRPOTrainer(model=tiny_debug_path, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    logs = trainer.state.log_history[0]
    # 4 tokens cannot hold a well-formed R1 answer (4 tags + a non-blank answer), so format < 1 on every completion
    # and the gate fixes every total at -1.
    assert logs["rewards/rules/mean"] == -1.0 and logs["reward"] == -1.0
    assert logs["rewards/rules/gated_frac"] == 1.0 and logs["rewards/rules/pass_rate"] == 0.0
    assert logs["rewards/format/mean"] < 1.0 and "rewards/math/mean" in logs
    assert {"format", "math"} <= set(trainer._logs["extra"])  # one completions-table column per rule
