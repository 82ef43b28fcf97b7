"""Row formatters for public datasets, used as a recipe dataset's ``map:`` (a dotted path; no code in YAML).

Each takes one row (a dict) and returns the columns to add or replace, in TRL's conversational format.
"""

from __future__ import annotations

from typing import Any

R1_SYSTEM_PROMPT = (
    "Solve the problem. Think step by step inside <think> </think>, then give only the final number inside "
    "<answer> </answer>."
)


def gsm8k_gold(answer: str) -> str:
    """The final number of a GSM8K solution: the text after ``####``, without thousands separators.

    >>> gsm8k_gold("She has 3 + 4 = 7 apples.\\n#### 1,007")
    '1007'
    """
    return answer.split("####")[-1].strip().replace(",", "")


def gsm8k_r1(row: dict[str, Any]) -> dict[str, Any]:
    """GSM8K (``question``, ``answer``) -> conversational ``prompt`` with the R1 answer format, and ``gold`` (the
    final number, for ``{name: math, column: gold}``).

    >>> out = gsm8k_r1({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\\n#### 4"})
    >>> out["prompt"][1], out["gold"]
    ({'role': 'user', 'content': 'What is 2 + 2?'}, '4')
    """
    return {
        "prompt": [
            {"role": "system", "content": R1_SYSTEM_PROMPT},
            {"role": "user", "content": row["question"]},
        ],
        "gold": gsm8k_gold(row["answer"]),
    }
