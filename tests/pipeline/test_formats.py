"""Row formatters used as a recipe dataset's `map:`."""

from __future__ import annotations

from trl_safeppo.pipeline.formats import R1_SYSTEM_PROMPT, gsm8k_gold, gsm8k_r1


def test_gsm8k_gold_is_the_number_after_the_marker():
    assert gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert gsm8k_gold("... so the total is $1,250.\n#### 1,250") == "1250"  # thousands separator dropped


def test_gsm8k_r1_builds_a_conversational_prompt_and_gold():
    row = {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"}
    out = gsm8k_r1(row)
    assert out["prompt"] == [{"role": "system", "content": R1_SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}]
    assert out["gold"] == "7"
    # the math rule scores a completion against the gold column
    from trl_safeppo.rewards import resolve

    rule = resolve({"name": "math", "column": "gold"})
    scores = rule(prompts=[out["prompt"]] * 2, completions=["<think>3+4</think><answer>7</answer>",
                                                             "<think>3+4</think><answer>8</answer>"], gold=["7", "7"])
    assert scores == [1.0, 0.0]
