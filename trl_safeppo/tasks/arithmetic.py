"""The embedded synthetic arithmetic task: ``What is a + b?`` in TRL's conversational format.

Three disjoint splits, all deterministic:

- ``sft``: warm-start data with a target ``completion``. Only part of the targets use the R1-style format
  ``<think>a + b = s</think><answer>s</answer>``; the rest answer in plain text (``The answer is s.``), and how
  often depends on the question's phrasing (:data:`USER_TEMPLATES`). After a short SFT the policy therefore uses
  the tagged format for one phrasing only, and a format + correctness reward has visible room to raise both
  (DeepSeek-R1, https://arxiv.org/abs/2501.12948).
- ``rl``: prompts for PPO / GRPO / rejection sampling, with the gold ``answer``.
- ``eval``: held-out prompts, never seen in ``sft`` or ``rl``.

The pool of problems (every pair of operands below :data:`MAX_OPERAND`) is shuffled once with a fixed seed and cut
into the three splits, so the splits are disjoint whatever ``seed`` is passed; ``seed`` only orders (and, with
``n``, subsamples) a split, and draws which ``sft`` examples are tagged.

The hyperparameters the demo recipe uses with this task and ``tiny://arithmetic`` are in :data:`DEMO_SETTINGS`;
docs/embedded_default.md records how they were measured.
"""

from __future__ import annotations

import random
import re

SPLITS = ("sft", "rl", "eval")

MAX_OPERAND = 100  # operands a, b in [0, MAX_OPERAND): one- and two-digit numbers
EVAL_SIZE = 300
RL_SIZE = 2000
_PARTITION_SEED = 20250101  # fixed: the splits never depend on the caller's seed

SYSTEM_PROMPT = "Think in <think> </think>, then answer in <answer> </answer>."
# Two phrasings of the question. The sft targets use the tagged format with a different probability for each, so
# after SFT the policy tags one phrasing and answers the other in plain text (greedy format-pass about one half),
# while sampling still produces some tagged answers to the second phrasing for a format reward to reinforce.
USER_TEMPLATES: dict[str, float] = {  # template -> fraction of its sft targets in the tagged format
    "What is {a} + {b}?": 0.9,
    "Add {a} and {b}.": 0.3,
}
# The R1-style answer format: the sum written out in think tags, then the bare number in answer tags, nothing else.
ANSWER_FORMAT = "<think>{a} + {b} = {answer}</think><answer>{answer}</answer>"
PLAIN_FORMAT = "The answer is {answer}."
ANSWER_FORMAT_REGEX = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"

# Tuned together with tiny://arithmetic on CPU (docs/embedded_default.md has the runs and commands); the recipe
# helper copies these into recipes/demo.yaml. SFT: 3 epochs over the whole sft split at batch 32 (723 steps, about
# 110 s of one core without gradient checkpointing), constant learning rate then a cosine decay to 0 over the last
# 150 steps, leave greedy held-out accuracy (the math rule) ~0.9 and format-pass ~0.58 on the eval split. Held-out
# accuracy climbs steeply between about steps 350 and 600, and where that climb starts moves by tens of steps with
# float rounding (CPU kernels, seeds): a shorter SFT (the former 2 epochs at a constant 1e-3) ends on the climb and
# gave 0.16 with AVX-512 kernels, 0.56 with AVX2 ones on the same seed. GRPO at lr 1e-4 (4 prompts x 8 completions
# per step, linear decay over 60 steps) reaches format-pass 1.0; lr 3e-4 flips the format as fast but loses
# accuracy, lr 1e-3 destroys it.
DEMO_SETTINGS: dict[str, float | int | str | dict] = {
    "sft_learning_rate": 1e-3,
    "sft_lr_scheduler_type": "warmup_stable_decay",
    "sft_lr_scheduler_kwargs": {"num_decay_steps": 150},
    "sft_warmup_steps": 0.05,  # a fraction of the steps (transformers >= 5 takes a float here)
    "sft_num_train_epochs": 3,
    "sft_num_examples": MAX_OPERAND**2 - EVAL_SIZE - RL_SIZE,  # the whole sft split: 7700
    "sft_per_device_train_batch_size": 32,
    "rl_learning_rate": 1e-4,
    "rl_per_device_train_batch_size": 32,
    "rl_max_steps": 60,
    "beta": 0.02,
    "num_generations": 8,
    "max_completion_length": 24,
    "temperature": 1.0,
}

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_answer(text: str) -> str | None:
    """The stripped content of the last ``<answer>...</answer>`` in ``text``, or None when there is none."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def _pool() -> dict[str, list[tuple[int, int, int]]]:
    """Every problem ``(a, b, phrasing index)``, shuffled once with a fixed seed and cut into the three splits."""
    rng = random.Random(_PARTITION_SEED)
    problems = [(a, b, rng.randrange(len(USER_TEMPLATES))) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    rng.shuffle(problems)
    return {
        "eval": problems[:EVAL_SIZE],
        "rl": problems[EVAL_SIZE : EVAL_SIZE + RL_SIZE],
        "sft": problems[EVAL_SIZE + RL_SIZE :],
    }


def make_prompt(a: int, b: int, phrasing: int = 0) -> list[dict[str, str]]:
    """The conversational prompt for ``a + b``: the system turn and the question in phrasing ``phrasing``."""
    question = list(USER_TEMPLATES)[phrasing].format(a=a, b=b)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def make_completion(a: int, b: int, tagged: bool = True) -> str:
    """The target assistant text for ``a + b``: the R1-style tagged format, or the plain-text answer."""
    template = ANSWER_FORMAT if tagged else PLAIN_FORMAT
    return template.format(a=a, b=b, answer=a + b)


def load_arithmetic(split: str, n: int | None = None, seed: int = 0):
    """Load one split of the arithmetic task as a ``datasets.Dataset``.

    Args:
        split: ``"sft"``, ``"rl"`` or ``"eval"``.
        n: number of examples (the first ``n`` after shuffling with ``seed``); None for the whole split.
        seed: orders the split and draws which ``sft`` targets use the tagged format.

    Returns:
        Columns ``prompt`` (list of ``{"role", "content"}``) and ``answer`` (the gold sum, a string); the ``sft``
        split also has ``completion`` (a one-message assistant turn).
    """
    from datasets import Dataset

    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a split of the arithmetic task; accepted: {', '.join(SPLITS)}")
    problems = list(_pool()[split])
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= len(problems)):
        raise ValueError(f"n={n!r} for split {split!r}: pass an integer from 1 to {len(problems)}, or None for all")
    rng = random.Random(f"{split}-{seed}")
    rng.shuffle(problems)
    problems = problems[:n] if n is not None else problems
    tag_fraction = list(USER_TEMPLATES.values())
    rows: dict[str, list] = {"prompt": [], "answer": []}
    if split == "sft":
        rows["completion"] = []
    for a, b, phrasing in problems:
        rows["prompt"].append(make_prompt(a, b, phrasing))
        rows["answer"].append(str(a + b))
        if split == "sft":
            tagged = rng.random() < tag_fraction[phrasing]
            rows["completion"].append([{"role": "assistant", "content": make_completion(a, b, tagged)}])
    return Dataset.from_dict(rows)
