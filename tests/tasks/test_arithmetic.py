"""The embedded arithmetic task: deterministic, disjoint splits, correct gold answers, TRL's conversational format."""

from __future__ import annotations

import math
import re

import pytest

from trl_safeppo.tasks import arithmetic
from trl_safeppo.tasks.arithmetic import (
    ANSWER_FORMAT_REGEX,
    EVAL_SIZE,
    MAX_OPERAND,
    RL_SIZE,
    SYSTEM_PROMPT,
    USER_TEMPLATES,
    load_arithmetic,
    parse_answer,
)

# "What is 12 + 7?" / "Add 12 and 7." -> (12, 7)
_OPERANDS = re.compile(r"^(?:What is (\d+) \+ (\d+)\?|Add (\d+) and (\d+)\.)$")


def _operands(prompt) -> tuple[int, int]:
    match = _OPERANDS.match(prompt[-1]["content"])
    assert match is not None, prompt
    a, b = (int(g) for g in match.groups() if g is not None)
    return a, b


@pytest.fixture(scope="module")
def splits():
    return {split: load_arithmetic(split) for split in arithmetic.SPLITS}


def test_split_sizes_cover_every_problem_once(splits):
    # every pair (a, b) with 0 <= a, b < 100 appears in exactly one split: 100 * 100 = 10000 problems
    assert len(splits["eval"]) == EVAL_SIZE
    assert len(splits["rl"]) == RL_SIZE
    assert len(splits["sft"]) == MAX_OPERAND**2 - EVAL_SIZE - RL_SIZE
    pairs = [_operands(p) for s in splits.values() for p in s["prompt"]]
    assert len(set(pairs)) == len(pairs) == MAX_OPERAND**2


def test_splits_are_disjoint_whatever_the_seed(splits):
    held_out = {_operands(p) for p in splits["eval"]["prompt"]}
    for seed in (0, 1):
        for split in ("sft", "rl"):
            seen = {_operands(p) for p in load_arithmetic(split, seed=seed)["prompt"]}
            assert not held_out & seen, f"{split} (seed {seed}) holds eval problems"
    assert not {_operands(p) for p in splits["sft"]["prompt"]} & {_operands(p) for p in splits["rl"]["prompt"]}


def test_deterministic_and_seed_only_reorders():
    first, again = load_arithmetic("rl", n=50), load_arithmetic("rl", n=50)
    assert first.to_list() == again.to_list()
    other = load_arithmetic("rl", seed=1)
    assert other["prompt"][:50] != first["prompt"]  # a different order...
    assert sorted(map(_operands, other["prompt"])) == sorted(map(_operands, load_arithmetic("rl")["prompt"]))  # ...same set


def test_gold_answers_are_the_sums(splits):
    for split in splits.values():
        for prompt, answer in zip(split["prompt"], split["answer"]):
            a, b = _operands(prompt)
            assert answer == str(a + b)


def test_conversational_format(splits):
    for name, split in splits.items():
        expected = {"prompt", "answer", "completion"} if name == "sft" else {"prompt", "answer"}
        assert set(split.column_names) == expected
        prompt = split[0]["prompt"]
        assert [m["role"] for m in prompt] == ["system", "user"]
        assert prompt[0]["content"] == SYSTEM_PROMPT
    completion = splits["sft"][0]["completion"]
    assert len(completion) == 1 and completion[0]["role"] == "assistant"


def test_sft_targets_are_correct_in_either_format(splits):
    for prompt, answer, completion in zip(*(splits["sft"][c] for c in ("prompt", "answer", "completion"))):
        text = completion[0]["content"]
        a, b = _operands(prompt)
        if re.match(ANSWER_FORMAT_REGEX, text):
            assert text == f"<think>{a} + {b} = {answer}</think><answer>{answer}</answer>"
            assert parse_answer(text) == answer
        else:
            assert text == f"The answer is {answer}."
            assert parse_answer(text) is None


def test_tagged_fraction_follows_the_phrasing(splits):
    # Each phrasing's share of tagged targets is a binomial draw: allow 5 standard deviations,
    # e.g. p = 0.9 over ~3850 targets: sd = sqrt(0.9 * 0.1 / 3850) = 0.0048, tolerance 0.024.
    for index, (template, fraction) in enumerate(USER_TEMPLATES.items()):
        stem = template.split("{")[0]
        tagged = [
            bool(re.match(ANSWER_FORMAT_REGEX, c[0]["content"]))
            for p, c in zip(splits["sft"]["prompt"], splits["sft"]["completion"])
            if p[-1]["content"].startswith(stem)
        ]
        sd = math.sqrt(fraction * (1 - fraction) / len(tagged))
        assert abs(sum(tagged) / len(tagged) - fraction) < 5 * sd, template
    # eval holds both phrasings, so a policy that tags only one of them passes the format on about half
    stems = [t.split("{")[0] for t in USER_TEMPLATES]
    counts = [sum(p[-1]["content"].startswith(s) for p in splits["eval"]["prompt"]) for s in stems]
    assert min(counts) > 0.3 * EVAL_SIZE


def test_n_subsamples_and_bad_input_is_named():
    assert len(load_arithmetic("eval", n=7)) == 7
    assert load_arithmetic("eval", n=7)["prompt"] == load_arithmetic("eval")["prompt"][:7]
    with pytest.raises(ValueError, match=r"split='test'.*accepted: sft, rl, eval"):
        load_arithmetic("test")
    with pytest.raises(ValueError, match=r"n=0 .*from 1 to 300"):
        load_arithmetic("eval", n=0)
    with pytest.raises(ValueError, match=r"n=301"):
        load_arithmetic("eval", n=301)


def test_parse_answer():
    assert parse_answer("<think>1 + 2 = 3</think><answer> 3 </answer>") == "3"
    assert parse_answer("<answer>1</answer><answer>2</answer>") == "2"  # the last block counts
    assert parse_answer("The answer is 3.") is None


@pytest.mark.slow
def test_short_sft_gives_partial_accuracy(tmp_path):
    # The demo's SFT warm start (DEMO_SETTINGS) on tiny://arithmetic must leave the policy partly right and partly
    # in the tagged format, so that RL has room to improve the format. Margins from docs/embedded_default.md: after
    # this SFT (3 epochs, past the steep climb) the sums are ~0.9 right and format-pass is ~0.55, so exact match
    # (tagged and right) is about 0.55 x 0.9 = 0.5; the floors and ceilings below leave room for seed and kernel
    # noise but fail if SFT learns nothing, or both formats for both phrasings.
    import torch
    from trl import SFTConfig, SFTTrainer

    from trl_safeppo.models import load_causal_lm, load_tokenizer
    from trl_safeppo.tasks.arithmetic import DEMO_SETTINGS as S

    tok = load_tokenizer("tiny://arithmetic")
    model = load_causal_lm("tiny://arithmetic")
    args = SFTConfig(
        output_dir=str(tmp_path),
        learning_rate=S["sft_learning_rate"],
        lr_scheduler_type=S["sft_lr_scheduler_type"],
        lr_scheduler_kwargs=S["sft_lr_scheduler_kwargs"],
        gradient_checkpointing=False,
        warmup_steps=S["sft_warmup_steps"],
        num_train_epochs=S["sft_num_train_epochs"],
        per_device_train_batch_size=S["sft_per_device_train_batch_size"],
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # as the demo runs on a CPU; SFTConfig's default bf16 autocast is ~20x slower without bf16 units
        seed=0,
        disable_tqdm=True,
    )
    SFTTrainer(model=model, args=args, train_dataset=load_arithmetic("sft", n=S["sft_num_examples"]),
               processing_class=tok).train()

    rows = load_arithmetic("eval", n=200)
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows["prompt"]]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=S["max_completion_length"], do_sample=False)
    completions = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    formatted = [bool(re.match(ANSWER_FORMAT_REGEX, c)) for c in completions]
    exact = [f and parse_answer(c) == g for f, c, g in zip(formatted, completions, rows["answer"])]
    format_pass, exact_match = sum(formatted) / 200, sum(exact) / 200
    print(f"after SFT: exact match {exact_match:.3f}, format-pass {format_pass:.3f}")  # shown with pytest -rP
    assert 0.25 <= format_pass <= 0.75, completions[:5]  # one phrasing tagged, the other plain
    assert 0.02 <= exact_match <= 0.6, completions[:5]  # partial: learned something, far from solved
