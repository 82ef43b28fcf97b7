"""Harvesting during RL: a plain TRL GRPOTrainer on tiny://debug with the harvester attached.

What is checked: every generated completion is recorded once, with the same generate calls and the same logged
metrics as a run without the harvester; only passing completions reach the SFT set; provenance; resume from a
checkpoint drops the abandoned steps; evaluation prompts are never harvested.
"""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest

from trl_safeppo.harvest import HarvestCallback, HarvestingReward, finalize_harvest
from trl_safeppo.rejection_sampling import load_scored_samples, load_sft_dataset

STEPS, BATCH, GENERATIONS = 2, 4, 2  # 4 completions (2 prompts x 2) per step


class HasLetter:
    """Test reward: 1.0 when the completion contains ``letter``, else 0.0 (picklable, stable __name__)."""

    def __init__(self, letter: str):
        self.letter = letter
        self.__name__ = f"has_{letter}"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        text = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return [1.0 if self.letter in t else 0.0 for t in text]


def _train(tmp, reward_funcs, callbacks, *, max_steps=STEPS, resume=None, save_steps=1):
    from trl import GRPOConfig, GRPOTrainer

    from trl_safeppo.models import resolve_model_path
    from trl_safeppo.tasks.arithmetic import load_arithmetic

    args = GRPOConfig(
        output_dir=str(tmp), per_device_train_batch_size=BATCH, num_generations=GENERATIONS,
        max_completion_length=8, max_steps=max_steps, report_to="none", logging_steps=1, save_steps=save_steps,
        use_cpu=True, seed=7, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=resolve_model_path("tiny://debug"), reward_funcs=reward_funcs, args=args,
                          train_dataset=load_arithmetic("rl", n=8), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _comparable(log_history):
    timing = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    return [{k: v for k, v in entry.items() if k not in timing} for entry in log_history]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """The same tiny GRPO run twice, with and without the harvester, counting generation calls."""
    from trl import GRPOTrainer

    calls = {"n": 0}
    original = GRPOTrainer._generate

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    root = tmp_path_factory.mktemp("harvest")
    mp = pytest.MonkeyPatch()
    mp.setattr(GRPOTrainer, "_generate", counting)
    try:
        plain = _train(root / "plain", [HasLetter("o")], [])
        plain_calls, calls["n"] = calls["n"], 0
        harvest = HarvestCallback(root / "data", stage="grpo")
        trainer = _train(root / "trainer", [harvest.watch(HasLetter("o"))], [harvest])
        harvest_calls = calls["n"]
    finally:
        mp.undo()
    return SimpleNamespace(root=root, harvest=harvest, trainer=trainer, plain=plain,
                           plain_calls=plain_calls, harvest_calls=harvest_calls)


def test_harvest_costs_no_generation_and_changes_no_metric(harvested):
    h = harvested
    # one generation per optimizer step in both runs: the harvester adds no generate call
    assert h.plain_calls == h.harvest_calls == STEPS
    # same seed, same rewards returned -> the same training, metric for metric, under the same names
    assert _comparable(h.trainer.state.log_history) == _comparable(h.plain.state.log_history)
    assert "rewards/has_o/mean" in h.trainer.state.log_history[0]
    # every generated completion recorded exactly once: 2 steps x 4 completions
    scored = load_scored_samples(h.root / "data")
    assert len(scored) == STEPS * BATCH == h.harvest.summary.completions_generated
    assert sorted(scored["step"]) == [0] * BATCH + [1] * BATCH  # policy after 0, then 1 optimizer steps
    # the logged mean reward of each step is the mean of what was recorded for that step
    for step, entry in enumerate(h.trainer.state.log_history[:STEPS]):
        recorded = [r["score"] for r in scored if r["step"] == step]
        assert entry["rewards/has_o/mean"] == pytest.approx(sum(recorded) / len(recorded))


def test_only_passing_completions_reach_the_sft_set(harvested):
    out = harvested.root / "data"
    scored = load_scored_samples(out)
    sft = load_sft_dataset(out)
    for row in scored:
        assert row["passed"] is ("o" in row["completion"][0]["content"])  # judged again, independently
        assert row["answer"]  # the dataset column travelled with the completion
        assert row["kept"] <= row["passed"]
    assert all("o" in c[0]["content"] for c in sft["completion"])
    n_passed = sum(scored["passed"])
    assert len(sft) == n_passed - harvested.harvest.summary.dropped.get("duplicate", 0)
    assert 0 < n_passed < len(scored)  # the test reward separates this sample; otherwise the test proves nothing


def test_harvest_provenance_and_card(harvested):
    out = harvested.root / "data"
    row = load_sft_dataset(out)[0]
    assert row["stage"] == "grpo"
    assert row["source_model"].endswith(("debug", harvested.trainer.model.config._name_or_path.split("/")[-1]))
    assert row["reward_spec"] == f"{HasLetter.__module__}.has_o"
    assert (row["temperature"], row["top_p"], row["max_new_tokens"], row["num_completions"], row["seed"]) == (
        1.0, 1.0, 8, GENERATIONS, 7,
    )
    assert row["step"] in (0, 1)
    card = (out / "README.md").read_text()
    assert f"| completions generated | {STEPS * BATCH} |" in card
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["step-00000001-rank0.jsonl",
                                                                 "step-00000002-rank0.jsonl"]


def test_resume_from_checkpoint_drops_abandoned_steps(harvested, tmp_path):
    # Continue the harvested run from checkpoint-1, as after a crash during step 3 of a longer run whose last
    # checkpoint was step 1: the parts committed at steps 2 and 3 belong to the abandoned trajectory. Step 3's is
    # removed when training begins, step 2 is regenerated: no duplicates, nothing stale.
    import shutil

    data = tmp_path / "data"
    shutil.copytree(harvested.root / "data", data)
    shutil.copytree(harvested.root / "trainer", tmp_path / "trainer")
    (data / "parts" / "step-00000003-rank0.jsonl").write_text(
        json.dumps({"prompt_id": 1, "step": 1, "prompt": "stale", "completion": "stale", "score": 1.0,
                    "passed": True, "rewards": {}}) + "\n"
    )
    harvest = HarvestCallback(data, stage="grpo")
    _train(tmp_path / "trainer", [harvest.watch(HasLetter("o"))], [harvest],
           resume=str(tmp_path / "trainer" / "checkpoint-1"))
    resumed = load_scored_samples(data)
    assert "stale" not in resumed["prompt"]
    assert len(resumed) == STEPS * BATCH
    assert sorted(p.name for p in (data / "parts").iterdir()) == ["step-00000001-rank0.jsonl",
                                                                  "step-00000002-rank0.jsonl"]
    assert sorted(resumed["step"]) == [0] * BATCH + [1] * BATCH
    # checkpoints restore the RNG state, so the regenerated step equals the uninterrupted run's
    assert (data / "scored.jsonl").read_text() == (harvested.root / "data" / "scored.jsonl").read_text()


def test_wrapper_returns_the_same_rewards_keeps_its_name_and_pickles(tmp_path):
    from trl_safeppo.rewards import resolve

    checker = resolve("math")
    wrapped = HarvestCallback(tmp_path).watch(checker)
    assert isinstance(wrapped, HarvestingReward) and wrapped.__name__ == "math"
    completions = [[{"role": "assistant", "content": "<answer>5</answer>"}],
                   [{"role": "assistant", "content": "<answer>6</answer>"}]]
    kwargs = dict(prompts=["2+3?", "2+3?"], completions=completions, answer=["5", "5"])
    assert wrapped(**kwargs) == checker(**kwargs) == [1.0, 0.0]
    clone = pickle.loads(pickle.dumps(wrapped))
    assert clone.__name__ == "math" and clone(**kwargs) == [1.0, 0.0]
    lines = (tmp_path / "staging" / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["passed"] for line in lines] == [True, False, True, False]


def test_evaluation_prompts_are_not_harvested(tmp_path):
    harvest = HarvestCallback(tmp_path, stage="grpo")
    wrapped = harvest.watch(HasLetter("o"))
    args = SimpleNamespace(process_index=0, temperature=1.0, top_p=1.0, max_completion_length=8, num_generations=2,
                           seed=0)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    harvest.on_train_begin(args, state, None)
    batch = dict(prompts=["p1", "p2"], completions=["go", "xx"], trainer_state=state)
    wrapped(**batch)  # training generation for step 1
    state.global_step = 1
    harvest.on_step_end(args, state, None)
    wrapped(**{**batch, "prompts": ["eval prompt", "eval prompt"]})  # evaluation after step 1
    harvest.on_evaluate(args, state, None)
    harvest.on_train_end(args, state, None)
    scored = load_scored_samples(tmp_path)
    assert scored["prompt"] == ["p1", "p2"]
    assert load_sft_dataset(tmp_path)["completion"] == ["go"]


def test_nothing_recorded_warns_and_writes_an_empty_valid_dataset(tmp_path):
    harvest = HarvestCallback(tmp_path, stage="grpo")
    args = SimpleNamespace(process_index=0, seed=0)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    harvest.on_train_begin(args, state, None)
    with pytest.warns(UserWarning, match="nothing was recorded.*HarvestCallback.watch"):
        harvest.on_train_end(args, state, None)
    assert len(load_sft_dataset(tmp_path)) == 0
    assert "| completions generated | 0 |" in (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="not a harvest directory"):
        finalize_harvest(tmp_path / "elsewhere")


_DISTRIBUTED_SCRIPT = """
import sys
from trl import GRPOConfig, GRPOTrainer
from trl_safeppo.harvest import HarvestCallback
from trl_safeppo.models import resolve_model_path
from trl_safeppo.tasks.arithmetic import load_arithmetic

harvest = HarvestCallback(sys.argv[1] + "/data", stage="grpo")
args = GRPOConfig(output_dir=sys.argv[1] + "/trainer", per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=8, max_steps=2, report_to="none", logging_steps=1, save_strategy="no",
                  seed=7, disable_tqdm=True, use_cpu=True, bf16=False)
trainer = GRPOTrainer(model=resolve_model_path("tiny://debug"), reward_funcs=[harvest.watch("math")], args=args,
                      train_dataset=load_arithmetic("rl", n=16), callbacks=[harvest])
trainer.train()
if trainer.accelerator.is_main_process:
    print("SUMMARY", harvest.summary.completions_generated)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_each_record_their_share(tmp_path):
    # 2 processes x 4 completions per step x 2 steps = 16 records, one part per process and step, merged once.
    import os
    import subprocess
    import sys

    script = tmp_path / "harvest.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(_free_port()), str(script), str(tmp_path)]
    done = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SUMMARY 16" in done.stdout
    parts = sorted(p.name for p in (tmp_path / "data" / "parts").iterdir())
    assert parts == [f"step-0000000{s}-rank{r}.jsonl" for s in (1, 2) for r in (0, 1)]
    scored = load_scored_samples(tmp_path / "data")
    assert len(scored) == 16 and set(scored["rewards"][0]) == {"math"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # a port no other test run holds (several helpers share this machine)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_harvest_on_our_trainers_records_every_generated_completion(kind, tmp_path):
    # SafeGRPOTrainer / SafePPOTrainer (GRPOTrainer subclasses, here with a reward rail adding its own reward
    # column): every completion returned by the trainer's generation is recorded once, and the checker's own
    # metrics keep their names.
    from trl import GRPOTrainer

    from trl_safeppo import SafeGRPOConfig, SafeGRPOTrainer, SafePPOConfig, SafePPOTrainer
    from trl_safeppo.models import resolve_model_path
    from trl_safeppo.tasks.arithmetic import load_arithmetic

    config_cls, trainer_cls = {"grpo": (SafeGRPOConfig, SafeGRPOTrainer), "ppo": (SafePPOConfig, SafePPOTrainer)}[kind]
    generated = []
    original = GRPOTrainer._generate

    def counting(self, prompts):
        out = original(self, prompts)
        generated.extend(out[3])  # the decoded completions
        return out

    harvest = HarvestCallback(tmp_path / "data", stage=kind)
    args = config_cls(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, max_steps=2, report_to="none", logging_steps=1, save_strategy="no",
                      use_cpu=True, bf16=False, disable_tqdm=True, rails={"clip": {"low": -5.0, "high": 5.0}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GRPOTrainer, "_generate", counting)
        trainer = trainer_cls(model=resolve_model_path("tiny://debug"),
                              reward_funcs=[harvest.watch(["format", "math"])], args=args,
                              train_dataset=load_arithmetic("rl", n=8), callbacks=[harvest])
        trainer.train()
    scored = load_scored_samples(tmp_path / "data")
    assert len(generated) > 0
    assert [c[0]["content"] for c in scored["completion"]] == [c[0]["content"] for c in generated]
    assert set(scored["rewards"][0]) == {"format", "math"}
    assert {"rewards/rules/mean", "rewards/format/mean", "rewards/rules/pass_rate"} <= set(trainer.state.log_history[0])
