"""User-defined reward functions imported by dotted path in the tests (``rewards.user_rules:...``)."""

from __future__ import annotations

from trl_safeppo.rewards import reward_factory, reward_function


@reward_function
def starts_with_yes(prompts=None, completions=None, completion_ids=None, **kwargs):
    return [1.0 if str(c).startswith("yes") else 0.0 for c in completions]


@reward_factory
def make_contains(word: str):
    return _Contains(word)


class _Contains:
    __name__ = "contains"

    def __init__(self, word):
        self.word = word

    def __call__(self, prompts=None, completions=None, **kwargs):
        return [float(self.word in c) for c in completions]


def raises(prompts=None, completions=None, **kwargs):
    raise KeyError("boom")


def wrong_length(prompts=None, completions=None, **kwargs):
    return [1.0]


def wrong_type(prompts=None, completions=None, **kwargs):
    return ["high" for _ in completions]


def unmarked(prompts=None, completions=None, **kwargs):
    """A reward function without @reward_function: a dotted path to it is refused."""
    return [1.0 for _ in completions]


NOT_CALLABLE = 3
