"""Offline rejection sampling on tiny://debug: what is kept, dedup, provenance, card, resume, bad input.

tiny://debug has random weights, so its completions are byte soup; the test rewards below judge them by a property
that some completions have and others lack (the letter "e"), which makes "only passing completions are kept"
checkable completion by completion.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest

import trl_safeppo.rejection_sampling as rs
from trl_safeppo.rejection_sampling import (
    RejectionSamplingConfig,
    load_scored_samples,
    load_sft_dataset,
    normalize_text,
    run_rejection_sampling,
    select,
)

# The test rewards below have no gold answer, so the verifier self-test (gold must pass, a wrong answer must fail)
# does not apply to them; test_reward_self_test_* cover it with the built-in rules.
SMALL = dict(model="tiny://debug", num_completions=4, max_new_tokens=8, batch_size=2, progress=False, self_test=False)


def _text(completion) -> str:
    return completion[0]["content"]


class HasLetterE:
    """Test reward: 1.0 when the completion contains the letter "e", else 0.0 (picklable, stable __name__)."""

    __name__ = "has_e"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        return [1.0 if "e" in _text(c) else 0.0 for c in completions]


class Always:
    """Test reward: the same value for every completion."""

    def __init__(self, value):
        self.value = value
        self.__name__ = f"always_{value}"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        return [self.value] * len(completions)


@pytest.fixture(scope="module")
def run_e(tmp_path_factory):
    out = tmp_path_factory.mktemp("rs") / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="rejection sampling", category=UserWarning)  # none of ours
        summary = run_rejection_sampling(
            RejectionSamplingConfig(**SMALL, num_prompts=4, reward=HasLetterE(), output_dir=str(out), seed=3)
        )
    return out, summary


def test_only_passing_completions_are_kept(run_e):
    out, summary = run_e
    scored = load_scored_samples(out)
    sft = load_sft_dataset(out)
    # 4 prompts x 4 completions
    assert len(scored) == summary.completions_generated == 16
    # "Scored samples" contract of docs/architecture.md, plus the source column `answer`
    for column in ("prompt_id", "prompt", "completion", "score", "passed", "rewards", "answer"):
        assert column in scored.column_names
    for row in scored:
        expected = "e" in _text(row["completion"])  # judged again here, independently of the run
        assert row["passed"] is expected
        assert row["score"] == (1.0 if expected else 0.0)
        assert row["rewards"] == {"has_e": row["score"]}
        assert row["kept"] is (row["drop_reason"] is None)
        assert row["drop_reason"] in (None, "failed_check", "duplicate")
        assert row["kept"] <= row["passed"]  # kept implies passed
    assert all("e" in _text(c) for c in sft["completion"])
    # every passing completion is kept unless it duplicates a kept one of the same prompt
    n_passed = sum(scored["passed"])
    assert summary.completions_passed == n_passed
    assert len(sft) == summary.kept == n_passed - summary.dropped.get("duplicate", 0)
    assert summary.dropped.get("failed_check", 0) == 16 - n_passed
    assert 0 < n_passed < 16  # the test reward separates this sample (seed 3); otherwise the test proves nothing
    kept_pairs = {(r["prompt_id"], r["sample_index"]) for r in scored if r["kept"]}
    assert kept_pairs == set(zip(sft["prompt_id"], sft["sample_index"]))


def test_provenance_columns_and_card(run_e):
    out, summary = run_e
    sft = load_sft_dataset(out)
    row = sft[0]
    assert row["prompt"][-1]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    assert row["source_model"] == "tiny://debug"
    assert row["stage"] == "rejection_sampling"
    assert row["reward_spec"] == f"{HasLetterE.__module__}.has_e"
    assert row["reward_version"].startswith("trl_safeppo-")
    assert (row["temperature"], row["top_p"], row["max_new_tokens"], row["num_completions"], row["seed"]) == (
        1.0, 1.0, 8, 4, 3,
    )
    assert row["score"] == 1.0
    # provenance=False leaves exactly TRL's prompt/completion format
    assert load_sft_dataset(out, provenance=False).column_names == ["prompt", "completion"]
    # JSONL copies hold the same rows
    lines = (out / "sft.jsonl").read_text().splitlines()
    assert [json.loads(line)["sample_index"] for line in lines] == sft["sample_index"]
    assert len((out / "scored.jsonl").read_text().splitlines()) == 16
    card = (out / "README.md").read_text()
    assert "| prompts seen | 4 |" in card
    assert "| completions generated | 16 |" in card
    assert f"| completions kept | {summary.kept} |" in card
    assert f"| failed_check | {summary.dropped['failed_check']} |" in card
    assert json.loads((out / "summary.json").read_text())["kept"] == summary.kept
    assert summary.completions_per_second > 0


def test_greedy_duplicates_are_removed(tmp_path):
    # Greedy decoding gives the 3 completions of a prompt the same text: 1 kept, 2 duplicates per prompt.
    summary = run_rejection_sampling(
        RejectionSamplingConfig(**{**SMALL, "num_completions": 3}, num_prompts=3, temperature=0.0,
                                reward=Always(1.0), dedup="exact", output_dir=str(tmp_path))
    )
    assert summary.completions_generated == 9
    assert summary.kept == 3  # one per prompt
    assert summary.dropped == {"duplicate": 6}  # 3 prompts x 2
    sft = load_sft_dataset(tmp_path)
    assert sorted(sft["prompt_id"]) == [0, 1, 2]
    assert sft["sample_index"] == [0, 0, 0]  # the first copy survives a tie


def _records(prompt_id, items):
    """items: (text, score, passed) -> scored records of one prompt, in generation order."""
    return [
        {"prompt_id": prompt_id, "sample_index": i, "completion": text, "score": score, "passed": passed}
        for i, (text, score, passed) in enumerate(items)
    ]


def test_select_modes_by_hand():
    groups = {
        0: _records(0, [("A", 1.0, True), ("a ", 0.9, True), ("B", 0.5, True), ("C", 0.2, False)]),
        1: _records(1, [("X", 0.0, False), ("Y", 0.0, False)]),  # never solved
        2: _records(2, [("P", 1.0, True), ("Q", 2.0, True)]),  # always solved
    }

    def run(**kwargs):
        fresh = {k: [dict(r) for r in v] for k, v in groups.items()}
        kept, dropped = select(fresh, **kwargs)
        return [(r["prompt_id"], r["completion"]) for r in kept], dict(dropped)

    # all_passing + normalized dedup: "a " normalizes to "a" == "A" and scores lower -> dropped as duplicate
    assert run() == ([(0, "A"), (0, "B"), (2, "P"), (2, "Q")], {"duplicate": 1, "failed_check": 3})
    # exact dedup keeps both spellings
    assert run(dedup="exact")[0] == [(0, "A"), (0, "a "), (0, "B"), (2, "P"), (2, "Q")]
    # best_of_n: highest passing score per prompt; prompt 2 -> Q (2.0 > 1.0)
    assert run(selection="best_of_n") == (
        [(0, "A"), (2, "Q")], {"duplicate": 1, "failed_check": 3, "not_top_ranked": 2}
    )
    # top_k=2 after dedup: prompt 0 ranks A (1.0), B (0.5)
    assert run(selection="top_k", top_k=2)[0] == [(0, "A"), (0, "B"), (2, "P"), (2, "Q")]
    # threshold 0.9 ignores `passed`: A 1.0, "a " 0.9 (duplicate of A), P, Q
    assert run(selection="threshold", score_threshold=0.9) == (
        [(0, "A"), (2, "P"), (2, "Q")], {"below_threshold": 4, "duplicate": 1}
    )
    # pass_rate_band (0, 1): prompt 0 has pass rate 3/4 -> kept; prompt 1 (0/2) and prompt 2 (2/2) are out
    assert run(selection="pass_rate_band") == (
        [(0, "A"), (0, "B")], {"outside_pass_rate_band": 4, "duplicate": 1, "failed_check": 1}
    )
    # cap 1 per prompt keeps the highest score
    assert run(max_per_prompt=1)[0] == [(0, "A"), (2, "Q")]
    assert normalize_text("  A\tB  ") == "a b"


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    # 6 prompts in chunks of 2 -> 3 chunks; the first attempt dies while generating the second chunk.
    config = dict(**SMALL, num_prompts=6, reward=HasLetterE(), seed=11)
    original = rs.run._process_chunk
    calls = []

    def dies_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(*args, **kwargs)

    monkeypatch.setattr(rs.run, "_process_chunk", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_rejection_sampling(RejectionSamplingConfig(**config, output_dir=str(tmp_path / "resumed")))
    assert sorted(p.name for p in (tmp_path / "resumed" / "parts").iterdir()) == ["chunk-000000.jsonl"]
    assert not (tmp_path / "resumed" / "summary.json").exists()
    monkeypatch.setattr(rs.run, "_process_chunk", original)

    resumed = run_rejection_sampling(RejectionSamplingConfig(**config, output_dir=str(tmp_path / "resumed")))
    straight = run_rejection_sampling(RejectionSamplingConfig(**config, output_dir=str(tmp_path / "straight")))
    assert resumed.chunks_resumed == 1 and straight.chunks_resumed == 0
    assert resumed.completions_generated_now == 16 and straight.completions_generated_now == 24  # 4 + 6 prompts x 4
    for name in ("scored.jsonl", "sft.jsonl"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "straight" / name).read_text()
    ids = [(r["prompt_id"], r["sample_index"]) for r in load_scored_samples(tmp_path / "resumed")]
    assert len(ids) == len(set(ids)) == 24  # no duplicates

    # a finished run rerun with the same settings regenerates nothing
    again = run_rejection_sampling(RejectionSamplingConfig(**config, output_dir=str(tmp_path / "straight")))
    assert again.chunks_resumed == 3 and again.completions_generated_now == 0 and again.kept == straight.kept


def test_different_run_in_output_dir_is_refused_unless_overwrite(run_e, tmp_path):
    import shutil

    out = tmp_path / "copy"  # a copy: the module's run stays intact for the other tests
    shutil.copytree(run_e[0], out)
    (tmp_path / "foreign").mkdir()
    different = dict(**SMALL, num_prompts=4, reward=HasLetterE(), output_dir=str(out), seed=4)  # seed 3 -> 4
    with pytest.raises(ValueError, match=r"already holds a different run.*seed.*overwrite=True"):
        run_rejection_sampling(RejectionSamplingConfig(**different))
    (tmp_path / "foreign" / "notes.txt").write_text("not a run")
    with pytest.raises(ValueError, match="holds no rejection-sampling run"):
        run_rejection_sampling(
            RejectionSamplingConfig(**{**different, "output_dir": str(tmp_path / "foreign")}, overwrite=True)
        )
    summary = run_rejection_sampling(RejectionSamplingConfig(**{**different, "num_prompts": 1}, overwrite=True))
    assert summary.prompts_seen == 1 and len(load_scored_samples(out)) == 4


def test_zero_prompts_gives_empty_valid_dataset_with_card(tmp_path):
    with pytest.warns(UserWarning, match="no prompts to sample"):
        summary = run_rejection_sampling(
            RejectionSamplingConfig(**SMALL, num_prompts=0, reward=Always(1.0), output_dir=str(tmp_path))
        )
    assert (summary.prompts_seen, summary.completions_generated, summary.kept) == (0, 0, 0)
    assert len(load_sft_dataset(tmp_path)) == 0 and len(load_scored_samples(tmp_path)) == 0
    assert "| prompts seen | 0 |" in (tmp_path / "README.md").read_text()


def test_zero_kept_warns_and_keeps_the_columns(tmp_path):
    with pytest.warns(UserWarning, match="no completion was kept out of 4"):
        summary = run_rejection_sampling(
            RejectionSamplingConfig(**SMALL, num_prompts=1, reward=Always(0.0), output_dir=str(tmp_path))
        )
    assert summary.kept == 0 and summary.dropped == {"failed_check": 4}
    sft = load_sft_dataset(tmp_path)
    assert len(sft) == 0 and {"prompt", "completion", "source_model", "score"} <= set(sft.column_names)
    card = (tmp_path / "README.md").read_text()
    assert "Warning:** no completion was kept" in card and "| failed_check | 4 |" in card


def test_decontamination_drops_eval_prompts(tmp_path):
    from trl_safeppo.tasks.arithmetic import load_arithmetic

    source = load_arithmetic("rl", n=5)
    # the "eval set" repeats prompts 1 and 3 with another system prompt, other case and spacing
    users = [source[i]["prompt"][-1]["content"] for i in (1, 3)]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(
        json.dumps({"prompt": [{"role": "system", "content": "other"}, {"role": "user", "content": f"  {u.upper()} "}]})
        + "\n" for u in users
    ))
    summary = run_rejection_sampling(
        RejectionSamplingConfig(**{**SMALL, "num_completions": 1}, dataset=source, reward=Always(1.0),
                                decontaminate=str(eval_file), output_dir=str(tmp_path / "out"))
    )
    assert (summary.prompts_seen, summary.prompts_contaminated, summary.prompts_sampled) == (5, 2, 3)
    assert sorted(set(load_scored_samples(tmp_path / "out")["prompt_id"])) == [0, 2, 4]
    assert summary.dropped["contaminated"] == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_completions": 0}, "num_completions=0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"selection": "best"}, "selection='best'.*all_passing"),
        ({"selection": "threshold"}, "score_threshold=None"),
        ({"pass_rate_band": (0.5, 0.5)}, "pass_rate_band"),
        ({"dedup": "fuzzy"}, "dedup='fuzzy'"),
        ({"reward_model_weight": None}, "reward_model_weight=None.*pass a finite number"),
        ({"score_threshold": float("nan")}, "score_threshold=nan.*pass a finite number"),
        ({"sft_format": "chatml"}, "sft_format='chatml'"),
        ({"reward": "no_such_rule"}, "unknown rule 'no_such_rule'"),
        ({"use_vllm": True}, "use_vllm=True: vLLM is not installed.*pip install trl-safeppo\\[vllm\\]"),
    ],
)
def test_bad_config_names_the_field(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        RejectionSamplingConfig(**{**SMALL, "reward": "format", "output_dir": str(tmp_path), **bad})


def test_missing_reward_and_model_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="reward=None and reward_model=None"):
        run_rejection_sampling(RejectionSamplingConfig(**SMALL, output_dir=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="model='./nowhere' does not exist"):
        run_rejection_sampling(RejectionSamplingConfig(**{**SMALL, "model": "./nowhere"}, reward="format",
                                                       output_dir=str(tmp_path / "b")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reward_spec_failing_its_self_test_stops_before_generation(tmp_path):
    # `format` alone passes the self-test's control completion (right tags, wrong answer): refused.
    config = RejectionSamplingConfig(**{**SMALL, "self_test": True}, num_prompts=2, reward="format",
                                     output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"reward=RuleChecker\('format'.*fails its self-test.*control pass rate"):
        run_rejection_sampling(config)
    assert not (tmp_path / "out").exists()  # nothing written
    # prompts without the gold `answer` column cannot be self-tested: the message says how to proceed
    rows = tmp_path / "no_answer.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n")
    config = RejectionSamplingConfig(**{**SMALL, "self_test": True}, dataset=str(rows), reward="math",
                                     output_dir=str(tmp_path / "out2"))
    with pytest.raises(ValueError, match=r"cannot be self-tested.*\{answer\}.*self_test=False"):
        run_rejection_sampling(config)


def test_cli_sample_and_its_errors(tmp_path, capsys):
    from trl_safeppo.cli import main

    # `math` against the gold `answer` passes the self-test; the random tiny model solves nothing, hence the warning
    argv = ["sample", "--model", "tiny://debug", "--num-prompts", "2", "--num-completions", "2",
            "--max-new-tokens", "4", "--reward", "math", "--no-progress", "--output-dir", str(tmp_path)]
    with pytest.warns(UserWarning, match="no completion was kept out of 4"):
        assert main(argv) == 0
    assert "2 seen" in capsys.readouterr().out
    scored = load_scored_samples(tmp_path)
    assert Counter(scored["prompt_id"]) == {0: 2, 1: 2}
    assert scored[0]["rewards"] == {"math": 0.0}
    assert main([*argv[:-2], "--seed", "1", "--output-dir", str(tmp_path)]) == 2  # a different run: refused
    assert "already holds a different run" in capsys.readouterr().err


def test_cli_bad_config_file_is_one_error(tmp_path, capsys):
    from trl_safeppo.cli import main

    config = tmp_path / "rs.yaml"
    config.write_text("seed: [1\n")  # unclosed list
    assert main(["sample", "--config", str(config)]) == 2
    assert f"--config={str(config)!r} is not valid YAML/JSON" in capsys.readouterr().err
    config.write_text("seed: 1\nsede: 2\n")  # a typo of a field name
    assert main(["sample", "--config", str(config)]) == 2
    assert "unknown fields ['sede']" in capsys.readouterr().err


def test_sfttrainer_trains_on_the_selected_set(run_e, tiny_debug_path, tmp_path):
    # The SFT stage consumes the output as is: TRL's SFTTrainer, prompt/completion format, provenance columns kept.
    from trl import SFTConfig, SFTTrainer

    out, summary = run_e
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                     use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=64)
    trainer = SFTTrainer(model=tiny_debug_path, args=args, train_dataset=load_sft_dataset(out))
    trainer.train()
    assert trainer.state.global_step == 1 and summary.kept >= 2
    assert trainer.state.log_history[-1]["train_loss"] > 0


def test_rule_checker_plus_reward_model_best_of_n(tmp_path):
    # tiny://debug loaded as a sequence classifier (a random score head) stands in for a reward model.
    summary = run_rejection_sampling(
        RejectionSamplingConfig(**{**SMALL, "num_completions": 3}, num_prompts=2, reward=HasLetterE(),
                                reward_model="tiny://debug", reward_model_weight=2.0, selection="best_of_n",
                                seed=3, output_dir=str(tmp_path))
    )
    scored = load_scored_samples(tmp_path)
    for row in scored:
        assert set(row["rewards"]) == {"has_e", "reward_model"}
        # score = rule total + 2.0 * reward-model logit; `passed` is the rule checker's alone
        assert row["score"] == pytest.approx(row["rewards"]["has_e"] + 2.0 * row["rewards"]["reward_model"])
        assert row["passed"] is (row["rewards"]["has_e"] == 1.0)
    for prompt_id in (0, 1):
        group = [r for r in scored if r["prompt_id"] == prompt_id]
        passing = [r for r in group if r["passed"]]
        kept = [r for r in group if r["kept"]]
        assert len(kept) == min(1, len(passing))  # best_of_n: one per prompt, among the passing ones
        if passing:
            assert kept[0]["score"] == max(r["score"] for r in passing)
    assert summary.kept > 0  # this sample (seed 3) has passing completions; otherwise the test proves little
    assert load_sft_dataset(tmp_path)["reward_spec"][0].endswith("has_e + 2 * reward_model(tiny://debug)")


_DISTRIBUTED_SCRIPT = """
import sys
from trl_safeppo.rejection_sampling import RejectionSamplingConfig, run_rejection_sampling
config = RejectionSamplingConfig(model="tiny://debug", num_prompts=6, num_completions=3, max_new_tokens=6,
                                 batch_size=2, reward="math", output_dir=sys.argv[1], progress=False, seed=5)
n = run_rejection_sampling(config, distributed=True).completions_generated
sys.stdout.write(f"SUMMARY {n}\\n")  # one write per process: print's separate writes interleave on the shared pipe
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_give_the_same_data_as_one(tmp_path):
    # Chunk i goes to process i % 2 and draws from its own seed, so `accelerate launch` with 2 processes writes
    # exactly the single-process table.
    import os
    import subprocess
    import sys

    script = tmp_path / "sample.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(_free_port()), str(script), str(tmp_path / "two")]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("SUMMARY 18") == 2  # both processes return the summary: 6 prompts x 3
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, check=True, timeout=600,
                   capture_output=True)
    assert sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) == [f"chunk-00000{i}.jsonl" for i in range(3)]
    assert (tmp_path / "two" / "scored.jsonl").read_text() == (tmp_path / "one" / "scored.jsonl").read_text()


def test_scored_table_feeds_build_pairs(run_e):
    # The "Scored samples" contract: pairs.build_pairs reads the table as written, without generating again.
    from trl_safeppo.pairs import build_pairs

    out, _ = run_e
    scored = load_scored_samples(out)
    pairs = build_pairs(scored)
    by_key = {(r["prompt_id"], _text(r["completion"])): r for r in scored}
    assert len(pairs) > 0
    for pair in pairs:
        chosen = by_key[(pair["prompt_id"], _text(pair["chosen"]))]
        rejected = by_key[(pair["prompt_id"], _text(pair["rejected"]))]
        assert chosen["passed"] and not rejected["passed"]  # a has_e completion over one without "e"
        assert pair["source_model"] == "tiny://debug" and pair["seed"] == 3


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # a port no other test run holds (several helpers share this machine)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_same_settings_but_other_prompts_is_a_different_run(tmp_path):
    # The fingerprint covers the content of the sampled rows: an edited data file is not resumed into.
    from trl_safeppo.tasks.arithmetic import load_arithmetic

    data = tmp_path / "prompts.jsonl"
    load_arithmetic("rl", n=2).to_json(str(data))
    config = dict(**{**SMALL, "num_completions": 1}, dataset=str(data), reward=Always(1.0),
                  output_dir=str(tmp_path / "out"))
    run_rejection_sampling(RejectionSamplingConfig(**config))
    load_arithmetic("rl", n=3).to_json(str(data))  # same path, one more row
    with pytest.raises(ValueError, match=r"different run.*the prompts \(their content\)"):
        run_rejection_sampling(RejectionSamplingConfig(**config))


def test_vllm_path_with_a_stand_in_module(tmp_path, monkeypatch):
    # vLLM is not installed here; a stand-in with vLLM's API (LLM.generate -> outputs with text, token_ids,
    # finish_reason; SamplingParams) checks the wiring: settings and per-chunk seeds reach vLLM, outputs are scored.
    import importlib.machinery
    import sys
    import types

    calls = []

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, model, seed, gpu_memory_utilization):
            self.model = model

        def get_tokenizer(self):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.model)

        def generate(self, prompts, params, use_tqdm=False):
            calls.append(params.kwargs)
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f"eh {i}", token_ids=[1, 2], finish_reason="stop") if i % 2 else
                                 out(text="xx", token_ids=[3], finish_reason="length")
                                 for i in range(params.kwargs["n"])]) for _ in prompts]

    stub = types.ModuleType("vllm")
    stub.LLM, stub.SamplingParams = LLM, SamplingParams
    stub.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", stub)
    summary = run_rejection_sampling(
        RejectionSamplingConfig(**SMALL, num_prompts=3, reward=HasLetterE(), use_vllm=True, output_dir=str(tmp_path))
    )
    # 3 prompts in chunks of 2 -> 2 calls, each with the recorded settings and its own seed
    assert [c["n"] for c in calls] == [4, 4] and calls[0]["max_tokens"] == 8 and calls[0]["temperature"] == 1.0
    assert calls[0]["seed"] == rs.generation.chunk_seed(0, 0) and calls[1]["seed"] == rs.generation.chunk_seed(0, 1)
    scored = load_scored_samples(tmp_path)
    assert scored["truncated"][:4] == [True, False, True, False] and scored["num_tokens"][:2] == [1, 2]
    # per prompt: "eh 1" and "eh 3" pass ("e"), "xx" twice fails
    assert summary.kept == 6 and summary.dropped == {"failed_check": 6}


def test_string_prompts_and_messages_format(tmp_path):
    # Plain-text prompts give plain-text completions (as messages: a user and an assistant turn); conversational
    # prompts in sft_format="messages" become one conversation per row.
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi:", "answer": "hi"}) + "\n")
    run_rejection_sampling(RejectionSamplingConfig(**{**SMALL, "num_completions": 1}, dataset=str(data),
                                                   reward=Always(1.0), output_dir=str(tmp_path / "plain")))
    row = load_sft_dataset(tmp_path / "plain", provenance=False)[0]
    assert row["prompt"] == "Say hi:" and isinstance(row["completion"], str)
    as_messages = rs.sft_row({**row, "prompt_id": 0, "sample_index": 0, "score": 1.0}, {}, "messages")["messages"]
    assert as_messages == [{"role": "user", "content": "Say hi:"}, {"role": "assistant", "content": row["completion"]}]

    run_rejection_sampling(RejectionSamplingConfig(**{**SMALL, "num_completions": 1}, num_prompts=1,
                                                   reward=Always(1.0), sft_format="messages",
                                                   output_dir=str(tmp_path / "messages")))
    messages = load_sft_dataset(tmp_path / "messages", provenance=False)
    assert messages.column_names == ["messages"]
    assert [m["role"] for m in messages[0]["messages"]] == ["system", "user", "assistant"]
