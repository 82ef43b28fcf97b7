"""SafePPOTrainer on multi-turn rollouts whose loss mask has holes (issue 20.3).

GRPO marks the tokens a tool or environment wrote with 0 in `tool_mask` (its `tools=` loop, or the `env_mask` a
`rollout_func` returns); the loss mask is `completion_mask * tool_mask`. Here a trivial rollout function plays a
two-turn episode on tiny://debug: the policy writes 2 tokens, a "tool" answers with 2 tokens, the policy writes 2 more
(the last is EOS): mask [1, 1, 0, 0, 1, 1]. The maths on fixed tensors is in test_ppo_maths.py.
"""

from __future__ import annotations

import torch

from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer
from tests.trainers.test_ppo_trainer import LengthReward, changed, config, params, prompts

POLICY_1, TOOL, POLICY_2 = [5, 6], [7, 8], [9]  # + EOS: 6 completion tokens, the tool's are 2 and 3
ENV_MASK = [1, 1, 0, 0, 1, 1]


class ToolRollout:
    """A picklable `rollout_func`: fixed completions with a tool answer in the middle, flagged by `env_mask`."""

    def __call__(self, prompts, trainer):
        tok = trainer.processing_class
        prompt_ids = [
            tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False), add_special_tokens=False)[
                "input_ids"
            ]
            for p in prompts
        ]
        completion = POLICY_1 + TOOL + POLICY_2 + [tok.eos_token_id]
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": [list(completion) for _ in prompts],
            "logprobs": [[0.0] * len(completion) for _ in prompts],
            "env_mask": [list(ENV_MASK) for _ in prompts],
        }


def test_score_on_the_last_policy_token_and_tool_tokens_skipped(tmp_path, tiny_debug_path, monkeypatch):
    # beta = 0 (no KL), gamma = lam = 1, no whitening: every valid token's return is the score, 6 tokens / 8 = 0.75
    # (LengthReward counts completion_ids), and the tool tokens 2, 3 have advantage = return = 0 and are masked.
    # Before issue 20 the score went on index n_valid - 1 = 3, a tool token, and every return was 0.
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    args = config(tmp_path, beta=0.0, gamma=1.0, lam=1.0, whiten_advantages=False, max_steps=2)
    trainer = SafePPOTrainer(
        model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts(),
        rollout_func=ToolRollout(),
    )
    outputs = []
    rollout = trainer._ppo_rollout

    def record(output):
        out = rollout(output)
        outputs.append({k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)})
        return out

    monkeypatch.setattr(trainer, "_ppo_rollout", record)
    policy_before, critic_before = params(trainer.model), params(trainer.critic)
    trainer.train()
    assert changed(policy_before, trainer.model) and changed(critic_before, trainer.critic)

    out = outputs[0]
    n = out["completion_ids"].shape[0]
    mask = torch.tensor(ENV_MASK, dtype=torch.float32).expand(n, -1)
    torch.testing.assert_close(out["tool_mask"].float(), mask)
    torch.testing.assert_close(out["ppo_mask"], mask)
    torch.testing.assert_close(out["ppo_returns"], 0.75 * mask)
    torch.testing.assert_close(out["advantages"], (0.75 - out["ppo_values"]) * mask)
    assert (out["advantages"][:, 2:4] == 0).all()
