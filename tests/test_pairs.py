"""Preference-pair builder: hand-built scored tables with the expected pairs worked out in comments."""

from __future__ import annotations

import json
import os

import pytest

datasets = pytest.importorskip("datasets")

from trl_safeppo.pairs import REPORT_FILE, build_pairs, build_pairs_with_report, save_pairs  # noqa: E402


def _msg(text, role="assistant"):
    return [{"role": role, "content": text}]


def _scored(rows):
    """rows: (prompt_id, completion text, score, passed)."""
    return datasets.Dataset.from_list(
        [
            {
                "prompt_id": pid,
                "prompt": _msg(f"What is {pid} + 1?", role="user"),
                "completion": _msg(text),
                "score": score,
                "passed": passed,
                "rewards": {"accuracy": score},
                "source_model": "tiny://arithmetic",
                "stage": "02-grpo",
                "reward_spec": "r1_math",
                "seed": 7,
            }
            for pid, text, score, passed in rows
        ]
    )


def test_chosen_passing_rejected_failing_with_provenance():
    scored = _scored(
        [
            (0, "<answer>1</answer>", 1.0, True),
            (0, "<answer>2</answer>", 0.2, False),
            (0, "<answer>9</answer>", 0.0, False),
            (1, "<answer>5</answer>", 0.5, False),
            (1, "<answer>2</answer>", 1.5, True),
        ]
    )
    pairs, report = build_pairs_with_report(scored, provenance={"stage": "03-rs"})
    # prompt 0: best = passed 1.0, worst = failed 0.0; prompt 1: passed 1.5 vs failed 0.5
    assert pairs["chosen"] == [_msg("<answer>1</answer>"), _msg("<answer>2</answer>")]
    assert pairs["rejected"] == [_msg("<answer>9</answer>"), _msg("<answer>5</answer>")]
    assert pairs["prompt"][0] == _msg("What is 0 + 1?", role="user")
    assert pairs["score_chosen"] == [1.0, 1.5] and pairs["score_rejected"] == [0.0, 0.5]
    assert pairs["stage"] == ["03-rs", "03-rs"]  # the keyword wins over the table's column
    assert pairs["source_model"] == ["tiny://arithmetic"] * 2 and pairs["seed"] == [7, 7]
    assert report.pairs == 2 and report.prompts == 2 and sum(report.skipped.values()) == 0


def test_a_passing_completion_is_never_rejected_for_a_higher_scoring_failure():
    # passed ranks first: the failing 5.0 cannot be chosen over the passing 1.0
    pairs = build_pairs(_scored([(0, "pass", 1.0, True), (0, "fail", 5.0, False)]))
    assert pairs["chosen"] == [_msg("pass")] and pairs["rejected"] == [_msg("fail")]


def test_margin_cap_and_each_completion_used_once():
    rows = [(0, t, s, None) for t, s in [("a", 0.9), ("b", 0.8), ("c", 0.5), ("d", 0.1), ("e", 0.0)]]
    pairs = build_pairs(_scored(rows), max_pairs_per_prompt=3, min_margin=0.5)
    # best-first against worst-first: a(0.9)-e(0.0) margin 0.9; b(0.8)-d(0.1) margin 0.7; c(0.5) has no partner left
    assert [(c[0]["content"], r[0]["content"]) for c, r in zip(pairs["chosen"], pairs["rejected"])] == [
        ("a", "e"),
        ("b", "d"),
    ]
    capped = build_pairs(_scored(rows), max_pairs_per_prompt=1)
    assert len(capped) == 1


def test_length_balancing_picks_a_similar_length_rejected():
    rows = [
        (0, "x" * 40, 1.0, True),  # chosen, 40 chars
        (0, "y" * 4, 0.0, False),  # worst, but 40 / 4 = 10 > 1.5
        (0, "z" * 35, 0.1, False),  # 40 / 35 = 1.14 <= 1.5
    ]
    pairs = build_pairs(_scored(rows), max_length_ratio=1.5)
    assert pairs["rejected"] == [_msg("z" * 35)]
    unbalanced = build_pairs(_scored(rows))
    assert unbalanced["rejected"] == [_msg("y" * 4)]


def test_skips_are_counted_by_reason():
    rows = [
        (0, "only one", 1.0, True),  # fewer_than_two
        (1, "same", 0.5, False),
        (1, "other", 0.5, False),  # all_equal
        (2, "dup", 1.0, True),
        (2, "dup ", 1.0, True),  # duplicate of "dup" after strip
        (2, "bad", None, None),  # unscored -> prompt 2 has one distinct completion left
        (3, "good", 1.0, True),
        (3, "close", 0.9, True),  # margin 0.1 < 0.5 -> below_margin
        (4, "win", 1.0, True),
        (4, "lose", 0.0, False),  # the only pair
    ]
    pairs, report = build_pairs_with_report(_scored(rows), min_margin=0.5)
    assert len(pairs) == 1 and pairs["prompt_id"] == [4]
    assert report.skipped == {
        "unscored": 1,
        "duplicate_completions": 1,
        "fewer_than_two": 2,
        "all_equal": 1,
        "below_margin": 1,
        "length_unbalanced": 0,
        "duplicate_pairs": 0,
    }
    assert "1 pairs from 1/5 prompts" in report.summary()


def test_duplicate_pairs_across_prompt_ids_are_dropped():
    rows = [(0, "right", 1.0, True), (0, "wrong", 0.0, False)]
    scored = _scored(rows)
    twice = datasets.concatenate_datasets([scored, scored.map(lambda r: {"prompt_id": 9})])
    twice = twice.map(lambda r: {"prompt": _msg("What is 0 + 1?", role="user")})
    pairs, report = build_pairs_with_report(twice)
    assert len(pairs) == 1 and report.skipped["duplicate_pairs"] == 1


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([(0, "a", 1.0, True), (0, "b", 1.0, True)], {}, "no preference pair could be built"),
        ([(0, "a", 1.0, True), (1, "b", 0.0, False)], {}, "fewer_than_two=2"),
        ([(0, "a", 1.0, True), (0, "b", 0.0, False)], {"min_margin": -1}, "min_margin=-1"),
        ([(0, "a", 1.0, True), (0, "b", 0.0, False)], {"max_pairs_per_prompt": 0}, "max_pairs_per_prompt=0"),
        ([(0, "a", 1.0, True), (0, "b", 0.0, False)], {"max_length_ratio": 0.5}, "max_length_ratio=0.5"),
        ([(0, "a", 1.0, True), (0, "b", 0.0, False)], {"provenance": {"model": "x"}}, "unknown keys ['model']"),
    ],
)
def test_bad_input_gives_one_clear_error(rows, kwargs, message):
    with pytest.raises(ValueError) as err:
        build_pairs(_scored(rows), **kwargs)
    assert message in str(err.value)


def test_missing_columns_are_named():
    table = datasets.Dataset.from_list([{"prompt_id": 0, "prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['score'\]"):
        build_pairs(table)


def test_save_is_atomic_and_replaces(tmp_path):
    pairs, report = build_pairs_with_report(_scored([(0, "right", 1.0, True), (0, "wrong", 0.0, False)]))
    target = tmp_path / "data" / "pairs"
    save_pairs(pairs, target, report)
    assert datasets.load_from_disk(str(target))["chosen"] == [_msg("right")]
    with open(target / REPORT_FILE) as f:
        assert json.load(f)["pairs"] == 1
    # a second save replaces the first, and leaves no temporary directory behind
    more = build_pairs(
        _scored([(0, "right", 1.0, True), (0, "wrong", 0.0, False), (1, "a", 1.0, True), (1, "b", 0.0, False)])
    )
    save_pairs(more, target)
    assert len(datasets.load_from_disk(str(target))) == 2
    assert sorted(os.listdir(tmp_path / "data")) == ["pairs"]


def test_pairs_train_with_safe_dpo(tmp_path, tiny_debug_path):
    pytest.importorskip("trl")
    from trl_safeppo import SafeDPOConfig, SafeDPOTrainer

    rows = [(i, f"<answer>{i + 1}</answer>", 1.0, True) for i in range(4)]
    rows += [(i, f"<answer>{i + 5}</answer> I think", 0.0, False) for i in range(4)]
    pairs = build_pairs(_scored(rows))
    args = SafeDPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to="none", use_cpu=True,
        save_strategy="no",
    )
    trainer = SafeDPOTrainer(model=tiny_debug_path, args=args, train_dataset=pairs)
    trainer.train()
    assert trainer.state.global_step == 1
