"""Stress test: a deliberately exploitable reward (reward = completion length in tokens).

Plain GRPOTrainer learns to stop emitting EOS and its mean completion length runs to the budget; SafeGRPOTrainer
with a length rail (a linear budget, group debiasing, or DAPO's soft overlong punishment) holds it.
The policy is tiny://debug with its EOS logit row pointed at the mean final hidden state, so that it starts with
short completions (about 7 tokens of 24) and has room to grow.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl_safeppo import SafeGRPOConfig, SafeGRPOTrainer  # noqa: E402

MAX_LEN = 24
STEPS = 20


class TokenLength:
    """The exploitable reward: one point per generated token."""

    __name__ = "token_length"

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        return [float(len(ids)) for ids in completion_ids]


@pytest.fixture(scope="module")
def eos_biased_model(tmp_path_factory, tiny_debug_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_debug_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_debug_path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 1?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    torch.manual_seed(0)
    out = model.generate(
        ids.repeat(8, 1), do_sample=True, max_new_tokens=32, output_hidden_states=True, return_dict_in_generate=True
    )
    hidden = torch.cat([h[-1][:, -1] for h in out.hidden_states[1:]])
    direction = hidden.mean(0) / hidden.mean(0).norm()
    with torch.no_grad():  # EOS logit = 4 * (h . mean direction): EOS is likely from the start
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = 4.0 * direction
    path = tmp_path_factory.mktemp("eos_biased")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _lengths(trainer_cls, config_cls, model, tmp_path, **extra):
    prompts = [[{"role": "user", "content": f"What is {i} + {i % 7}?"}] for i in range(256)]
    args = config_cls(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=8, max_completion_length=MAX_LEN,
        max_steps=STEPS, logging_steps=1, learning_rate=5e-4, beta=0.0, seed=0, save_strategy="no",
        report_to="none", use_cpu=True, **extra,
    )
    trainer = trainer_cls(
        model=model, reward_funcs=TokenLength(), args=args, train_dataset=Dataset.from_dict({"prompt": prompts})
    )
    trainer.train()
    return [h["completions/mean_length"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def plain_lengths(tmp_path_factory, eos_biased_model):
    return _lengths(GRPOTrainer, GRPOConfig, eos_biased_model, tmp_path_factory.mktemp("plain"))


def test_plain_grpo_inflates_the_length(plain_lengths):
    tail = sum(plain_lengths[-5:]) / 5
    assert plain_lengths[0] < 10  # starts short
    assert tail > 0.8 * MAX_LEN and tail > 2 * plain_lengths[0]  # runs to the generation budget


@pytest.mark.parametrize(
    "rails",
    [
        # linear budget: shaped reward len - 2 * max(0, len - 6) peaks at 6 tokens
        {"length": {"budget": 6, "penalty_per_token": 2.0}},
        # group debiasing: the part of the reward explained by length within a group is removed
        {"length": {"debias": "group"}},
        # DAPO soft overlong punishment over the last 16 tokens of the budget, scaled to the reward's size
        {"length": {"overlong_buffer": 16, "overlong_factor": 30.0}},
    ],
    ids=["budget", "debias", "overlong"],
)
def test_length_rail_holds_the_length(tmp_path, eos_biased_model, plain_lengths, rails):
    safe = _lengths(SafeGRPOTrainer, SafeGRPOConfig, eos_biased_model, tmp_path, rails=rails)
    assert safe[0] == plain_lengths[0]  # same start (same seed, same first batch)
    tail_plain, tail_safe = sum(plain_lengths[-5:]) / 5, sum(safe[-5:]) / 5
    assert tail_safe < 0.5 * MAX_LEN  # held well below the budget plain GRPO runs to
    assert tail_plain - tail_safe > 8
