"""Verifier self-test: gold-vs-gold, None / unparseable rates, control, thread and process determinism, CLI."""

from __future__ import annotations

import json

import pytest

from trl_safeppo.cli import main
from trl_safeppo.rewards.selftest import check_rewards, render

ROWS = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
        for a, b in [(1, 2), (10, 5), (99, 1), (1234, 1), (0, 0), (7, 7)]]
R1_SPEC = [{"name": "math"}, {"name": "format", "weight": 0.5}]


def test_gold_vs_gold_full_marks_and_determinism_across_threads_and_processes():
    report = check_rewards(R1_SPEC, ROWS, threads=3, processes=2)
    assert report.ok, report.format()
    assert report.gold_pass_rate == 1.0 and report.gold_mean_total == 1.5  # 1 + 0.5 on every row
    assert report.control_pass_rate == 0.0
    assert report.deterministic_threads is True and report.deterministic_processes is True
    assert report.none_rate == 0.0 and report.n == 6


def test_unparseable_gold_and_none_rates_fail_past_thresholds():
    rows = ROWS[:3] + [{"answer": "n/a"}]  # "n/a" parses to nothing in math-verify
    report = check_rewards("math", rows, threads=0, processes=0)
    # 1 of 4 golds unparseable -> 25% unparseable and None (math is the only rule), both above 5%.
    assert report.unparseable_gold_rate == 0.25 and report.none_rate == 0.25
    assert not report.ok
    assert any("unparseable-gold rate 0.250" in f for f in report.failures)
    relaxed = check_rewards("math", rows, threads=0, processes=0, max_unparseable_gold_rate=0.3, max_none_rate=0.3)
    assert relaxed.ok, relaxed.format()


def test_a_rule_that_cannot_give_full_marks_is_caught():
    # gsm8k strict wants '#### N'; the default R1 gold template never has it.
    report = check_rewards("gsm8k", ROWS, threads=0, processes=0)
    assert report.gold_pass_rate == 0.0 and not report.ok
    fixed = check_rewards("gsm8k", ROWS, gold_template="#### {answer}", threads=0, processes=0)
    assert fixed.ok, fixed.format()


def test_a_rule_that_passes_anything_is_caught():
    # A regex that matches the tag itself passes the control completion "<answer>__wrong__</answer>" too.
    report = check_rewards({"name": "regex", "pattern": "answer"}, ROWS, threads=0, processes=0)
    assert report.control_pass_rate == 1.0 and not report.ok


def test_gold_template_errors_and_render():
    assert render("<a>{answer}</a>", {"answer": "7"}) == "<a>7</a>"
    assert render("<a>{answer}</a>", {"answer": "7"}, wrong=True) == "<a>__wrong__</a>"
    with pytest.raises(ValueError, match=r"field \{solution\} is not a dataset column"):
        check_rewards("math", ROWS, gold_template="{solution}", threads=0, processes=0)


def test_cli_exit_codes(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    out = tmp_path / "report.json"
    spec = "[{name: math}, {name: format, weight: 0.5}]"
    args = ["check-rewards", "--reward", spec, "--dataset", str(data), "--threads", "2", "--processes", "0"]
    assert main([*args, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ok"] is True
    assert "gold-vs-gold pass rate : 100.0%" in capsys.readouterr().out
    assert main(["check-rewards", "--reward", "gsm8k", "--dataset", str(data), "--processes", "0"]) == 1
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reward:\n  - {name: math, weight: 2.0}\n")
    assert main(["check-rewards", "--reward", str(recipe), "--dataset", str(data), "--processes", "0"]) == 0
    assert main(["check-rewards", "--reward", "nope", "--dataset", str(data)]) == 2  # configuration error
    assert "unknown rule 'nope'" in capsys.readouterr().err


class Sleeper:
    """A rule that hangs: 1.0 per completion after `seconds`."""

    __name__ = "sleeper"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, prompts=None, completions=None, **kwargs):
        import time

        time.sleep(self.seconds)
        return [1.0] * len(completions)


def test_a_hanging_rule_fails_the_self_test_within_the_timeout():
    from trl_safeppo.rewards.timeout import RewardTimeoutError

    spec = [{"name": "math"}, {"name": Sleeper(60), "alias": "slow"}]
    with pytest.raises(RewardTimeoutError) as err:
        check_rewards(spec, ROWS, threads=0, processes=0, timeout_s=1)
    message = str(err.value)
    assert "\n" not in message  # one line, naming the rule and the timeout
    assert message.startswith("reward rule 'slow' did not return within reward_timeout_s=1 s")
    # the same rule within its timeout passes (and the workers are gone afterwards: nothing hangs around)
    fast = [{"name": "math"}, {"name": Sleeper(0.0), "alias": "slow", "weight": 0.0}]
    assert check_rewards(fast, ROWS, threads=0, processes=0, timeout_s=5).ok


def test_cli_timeout_option(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    base = ["check-rewards", "--reward", "math", "--dataset", str(data), "--threads", "0", "--processes", "0"]
    assert main([*base, "--timeout-s", "none"]) == 0
    assert main([*base, "--timeout-s", "30"]) == 0
    with pytest.raises(SystemExit):
        main([*base, "--timeout-s", "-1"])
    assert "--timeout-s=-1.0 is invalid; use a number of seconds > 0" in capsys.readouterr().err
