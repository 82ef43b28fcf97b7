"""The real SafePPOTrainer, SafeGRPOTrainer and SafeDPOTrainer under accelerate's FSDP2 path, 2 CPU processes (gloo),
launched with the shipped recipes/accelerate/fsdp2.yaml (issue 20.1 / 20.5).

accelerate refuses FSDP without a GPU (it keeps the MULTI_CPU distributed type and ignores ACCELERATE_USE_FSDP), so
the worker applies the test harness `tests/trainers/_fsdp2_cpu.py`, which patches that one choice and nothing else:
from there on it is accelerate's own FSDP2 preparation, clipping and checkpointing, transformers' Trainer and TRL.
What the harness cannot show: NCCL, CUDA memory, mixed precision under FSDP2 (the CPU run is fp32)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.trainers._fsdp2_cpu import REPO, launch

WORKER = REPO / "tests" / "trainers" / "_fsdp2_trainer_worker.py"


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _ranks(out) -> list[dict]:
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow),
                                       pytest.param("fp16", marks=pytest.mark.slow)])
def test_safe_ppo_trainer_sharded_by_fsdp2_matches_one_process_resumes_and_saves(tmp_path, tiny_debug_path, precision):
    import os

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # 2 micro-batches per optimizer step: the critic's gradient sync is deferred (accelerator.no_sync, FSDP2's
    # set_requires_gradient_sync) as the Trainer defers the policy's
    code = {"fp32": "0", "bf16": "1", "fp16": "2"}[precision]
    # the reference: one process in the same precision; for fp16 in fp32 (accelerate has no fp16 autocast on the
    # CPU: a one-process fp16 run is an fp32 run)
    reference = "0" if precision == "fp16" else code
    _check(subprocess.run([sys.executable, str(WORKER), "ppo", str(one), "2", reference], env=env,
                          capture_output=True, text=True, timeout=600, cwd=str(REPO)))
    _check(launch([WORKER, "ppo", two, "2", code]))
    r0, r1 = _ranks(two)
    (u,) = [json.loads((one / "rank0.json").read_text())]
    assert u["world"] == 1 and u["distributed_type"] == "DistributedType.NO"
    assert r0["world"] == 2 and r0["distributed_type"] == r1["distributed_type"] == "DistributedType.FSDP"
    # bf16 / fp16: accelerate's FSDP2 MixedPrecisionPolicy (16-bit all-gathers, compute and reduce-scatters) over
    # fp32 master weights; fp32: no policy
    expected_dtype = {"fp32": "None", "bf16": "torch.bfloat16", "fp16": "torch.float16"}[precision]
    assert r0["fsdp_param_dtype"] == r0["fsdp_reduce_dtype"] == expected_dtype
    assert r0["master_dtypes"] == u["master_dtypes"] == ["torch.float32"]
    assert r0["recomputes"] == u["recomputes"] == [True, True]  # activation checkpointing in policy and critic
    # accelerate builds no GradScaler on the CPU (its fp16 loss scaling is GPU-only): fp16 here is FSDP2's fp16
    # gathers, compute and reduce-scatters without loss scaling, and the GradScaler under FSDP2 is not exercised
    assert r0["loss_scale"] is None and u["loss_scale"] is None

    # (a) policy, critic and reference: every parameter a DTensor sharded on dim 0; each process holds its half (the
    # value head's (1, 32) weight has one row, kept on process 0: the critic's 35264 numbers are 17648 + 17616). The Adam
    # moments of the policy (the Trainer's optimizer) and of the critic (its own) are sharded the same way.
    for name in ("policy", "critic"):
        s0, s1 = r0[name], r1[name]
        assert s0["all_dtensor"] and s1["all_dtensor"] and s0["placements"] == ["(Shard(dim=0),)"]
        assert s0["full_numel"] == u[name]["full_numel"] and not u[name]["all_dtensor"]
        assert s0["local_numel"] + s1["local_numel"] == s0["full_numel"]
        assert 0.45 * s0["full_numel"] < s0["local_numel"] < 0.55 * s0["full_numel"]
        assert s0["adam_all_dtensor"] and s0["adam_local_numel"] == s0["local_numel"]
        assert s1["adam_all_dtensor"] and s1["adam_local_numel"] == s1["local_numel"]
    assert r0["reference_all_dtensor"] and r1["reference_all_dtensor"]

    # (b) 3 PPO steps (each: greedy rollouts of 8 prompts, 6 tokens each, the same rollouts in both runs; 2
    # micro-batches of 4) give the unsharded weights. Sharded, each process back-propagates 2 rows per micro-batch
    # and FSDP averages the gradients in a reduce-scatter: the fp32 sums run in another order (~1e-7 relative), and
    # Adam, dividing by sqrt(v), carries that into the step of weights whose gradient is tiny. Bound: 1e-4, against
    # steps that move weights by up to lr x 3 = 3e-3 (measured: 8.0e-7 policy, 2.1e-8 critic).
    policy_1, critic_1 = torch.load(one / "policy.pt"), torch.load(one / "critic.pt")
    policy_2, critic_2 = torch.load(two / "policy.pt"), torch.load(two / "critic.pt")
    initial = AutoModelForCausalLM.from_pretrained(tiny_debug_path).state_dict()
    assert _max_diff(policy_1, {k: initial[k] for k in policy_1}) > 1e-3  # the policy moved
    if precision == "fp32":
        assert _max_diff(policy_2, policy_1) < 1e-4
        assert _max_diff(critic_2, critic_1) < 1e-4
    else:
        # 16-bit: the sharded run reduces gradients in 16 bits (bf16: 2^-9 = 0.2% per rounding; fp16: 2^-11), the
        # one process accumulates them in fp32, and Adam turns such differences of tiny gradients into differences
        # of whole steps; what must hold is the update as a whole: measured 8% apart for bf16 (cosine 0.997), 3.5%
        # for fp16 against fp32 (cosine 0.9994); bound 20%
        delta_1 = torch.cat([(policy_1[k] - initial[k]).flatten() for k in policy_1])
        delta_2 = torch.cat([(policy_2[k] - initial[k]).flatten() for k in policy_1])
        assert float((delta_2 - delta_1).norm() / delta_1.norm()) < 0.2
    # the global gradient norms of both models agree (measured: fp16 within 0.2% of fp32, bf16 within 2.5%)
    rel = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}[precision]
    for h2, h1 in zip(r0["logs"], u["logs"], strict=True):
        assert h2["grad_norm"] == pytest.approx(h1["grad_norm"], rel=rel)
        assert h2["ppo/val/grad_norm"] == pytest.approx(h1["ppo/val/grad_norm"], rel=rel)

    # (c) resume: a fresh trainer (sharded anew) resumed from checkpoint-2 takes step 3 exactly as the uninterrupted
    # run did: policy, critic, both optimizers' sharded moments and both learning-rate schedules came back
    assert r0["resumed_steps"] == 3 and r0["resumed_policy_sharded"] and r0["resumed_critic_sharded"]
    assert _max_diff(torch.load(two / "resumed_policy.pt"), policy_2) == 0.0
    assert _max_diff(torch.load(two / "resumed_critic.pt"), critic_2) == 0.0

    # (d) ordinary checkpoints: final/ (save_model) and checkpoint-2/critic load with transformers alone and hold
    # the full trained weights
    final = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    assert _max_diff({k: final[k] for k in policy_2}, policy_2) == 0.0
    critic_ckpt = AutoModelForSequenceClassification.from_pretrained(two / "run" / "checkpoint-2" / "critic",
                                                                      num_labels=1).state_dict()
    critic_at_2 = torch.load(two / "critic_step2.pt")
    assert _max_diff({"model." + k: v for k, v in critic_ckpt.items()}, critic_at_2) == 0.0

    # (e) tripwire rollback under FSDP2: the value loss trips at steps 1 and 2, each restoring the initial snapshot
    # (gathered in full, loaded into each process's shards): policy and critic end exactly where they started
    events = [json.loads(line) for line in (two / "rollback" / "tripwires.jsonl").read_text().splitlines()]
    assert [(e["step"], e["action"], e["details"]["restored_step"]) for e in events] == [(1, "rollback", 0),
                                                                                          (2, "rollback", 0)]
    for name in ("policy", "critic"):
        after, before = torch.load(two / f"rollback_{name}_after.pt"), torch.load(two / f"rollback_{name}_initial.pt")
        assert _max_diff(after, before) == 0.0


def _sharded_halves(figures: list[dict]) -> None:
    """Every parameter and Adam moment a dim-0 DTensor shard; the 2 processes' shards add up to the model."""
    s0, s1 = figures
    for s in (s0, s1):
        assert s["all_dtensor"] and s["placements"] == ["(Shard(dim=0),)"]
        assert s["adam_all_dtensor"] and s["adam_local_numel"] == s["local_numel"]
        assert 0.45 * s["full_numel"] < s["local_numel"] < 0.55 * s["full_numel"]
    assert s0["local_numel"] + s1["local_numel"] == s0["full_numel"]


def _check_resume_and_final(out, name: str, r0: dict, r1: dict) -> None:
    from transformers import AutoModelForCausalLM

    x = r0[name]
    _sharded_halves([x["policy"], r1[name]["policy"]])
    assert x["reference_all_dtensor"] and r1[name]["reference_all_dtensor"]
    # raise_kl acted (the KL of steps 2 and 3 is above the 1e-9 limit), so the checkpoint of step 2 holds a raised
    # beta; the resumed trainer starts from exactly the rails / KL-controller / ladder state of step 2
    at_2 = json.loads(x["rails_at_2"])
    assert at_2["beta"] > at_2["ladder"]["initial_beta"]
    assert x["rails_resumed"] == x["rails_at_2"] and r1[name]["rails_resumed"] == r1[name]["rails_at_2"]
    checkpoint = out / name / "checkpoint-2"
    saved = json.loads((checkpoint / "trl_safeppo_state.json").read_text())  # the package's state, in one file
    assert saved["tripwires"] == at_2["ladder"] and saved["beta"] == at_2["beta"]
    # step 3 after the resume (RNG states restored per process) is the uninterrupted run's step 3
    assert x["resumed_steps"] == 3 and x["resumed_sharded"]
    policy = torch.load(out / f"{name}_policy.pt")
    assert _max_diff(torch.load(out / f"{name}_resumed_policy.pt"), policy) == 0.0
    final = AutoModelForCausalLM.from_pretrained(out / name / "final").state_dict()  # an ordinary checkpoint
    assert _max_diff({k: final[k] for k in policy}, policy) == 0.0


@pytest.mark.distributed
def test_safe_grpo_trainer_sharded_by_fsdp2_checkpoints_rails_and_rolls_back(tmp_path, tiny_debug_path):
    _check(launch([WORKER, "grpo", tmp_path]))
    r0, r1 = _ranks(tmp_path)
    _check_resume_and_final(tmp_path, "grpo", r0, r1)
    # 3 optimizer steps, counted 3 by Adam: the snapshot taken before the first step (raise_kl keeps them) gathered
    # no optimizer state (torch's getter would have created it by a zero step, and Adam would count 4)
    assert r0["grpo"]["adam_steps"] == [3] and r1["grpo"]["adam_steps"] == [3]
    # rollback under FSDP2: step 2's KL trips; the last good snapshot is the initial one (step 1's candidate needs a
    # clean step 2), gathered in full when taken and put back into each process's shards: the initial weights
    events = [json.loads(line) for line in (tmp_path / "rollback" / "tripwires.jsonl").read_text().splitlines()]
    assert [(e["step"], e["action"], e["details"]["restored_step"]) for e in events] == [(2, "rollback", 0)]
    assert r0["rollback_sharded"]
    assert _max_diff(torch.load(tmp_path / "rollback_after.pt"), torch.load(tmp_path / "rollback_initial.pt")) == 0.0


@pytest.mark.distributed
def test_safe_dpo_trainer_sharded_by_fsdp2_checkpoints_its_tripwire_state(tmp_path, tiny_debug_path):
    _check(launch([WORKER, "dpo", tmp_path]))
    r0, r1 = _ranks(tmp_path)
    _check_resume_and_final(tmp_path, "dpo", r0, r1)
    assert r0["dpo"]["adam_steps"] == [3] and r1["dpo"]["adam_steps"] == [3]  # as for GRPO: no zero step counted
    # DPO's beta: 0.1 at step 1 (KL 0: clean), doubled by raise_kl at step 2, logged with step 3
    assert r0["dpo"]["betas"] == [0.1, 0.1, 0.2]


@pytest.mark.distributed
def test_a_rank_dying_in_the_sharded_critic_save_leaves_no_checkpoint_a_resume_would_trust(tmp_path, tiny_debug_path):
    """Issue 20, bad input: process 1 dies (os._exit, no cleanup) inside save_checkpoint_files at checkpoint-2, at the gather of
    the critic's Adam moments, while process 0 waits in the same collective."""
    from trl_safeppo.fileio import is_temporary
    from trl_safeppo.pipeline.checkpoints import (
        STATE_MARKER, checkpoint_problem, checkpoints, last_complete_checkpoint, set_aside_incomplete,
    )

    run = tmp_path / "run"
    # the job fails and does not hang: gloo reports the closed peer to process 0, torch.distributed.run sees process
    # 1's exit code and tears the group down (launch's timeout would raise TimeoutExpired instead)
    died = launch([WORKER, "ppo_die", tmp_path, "2"], timeout=600)
    assert died.returncode != 0
    assert "exitcode  : 17" in died.stderr  # process 1's os._exit(17), the root cause the launcher names
    assert (tmp_path / "rank1_died_at.txt").read_text() == "2"
    assert not (tmp_path / "rank0.json").exists() and not (tmp_path / "rank1.json").exists()  # nobody finished

    # checkpoint-2 has the Trainer's part (trainer_state.json, the policy's weights: transformers'
    # get_last_checkpoint would take it) but neither the critic nor the marker, which is written only after
    # save_checkpoint_files returns on process 0; checkpoint-1 is whole
    second, first = run / "checkpoint-2", run / "checkpoint-1"
    assert (second / "trainer_state.json").is_file() and (second / "model.safetensors").is_file()
    assert not (second / STATE_MARKER).exists() and not (second / "critic").exists()
    assert checkpoint_problem(second) is None  # complete by the Trainer's files alone: why the marker is required
    assert checkpoint_problem(second, require=(STATE_MARKER,)) == (
        f"no {STATE_MARKER} (killed while the trainer added its own state)")
    assert checkpoint_problem(first, require=(STATE_MARKER,)) is None and (first / "critic").is_dir()
    assert last_complete_checkpoint(run, require=(STATE_MARKER,)) == str(first)

    # leftovers of an atomic write (".tmp-*") are never taken for a checkpoint: only checkpoint-N folders count
    leftovers = [p for p in run.rglob("*") if is_temporary(p)]
    assert [p.name for p in checkpoints(run)] == ["checkpoint-2", "checkpoint-1"]
    assert not any(is_temporary(p) for p in checkpoints(run)) and leftovers == []  # the writers cleaned up

    # what the recipe runner does before a resume: the incomplete checkpoint moves aside, the complete one is used
    (note,) = set_aside_incomplete(run, require=(STATE_MARKER,))
    assert note.startswith(f"checkpoint-2 is incomplete (no {STATE_MARKER}")
    assert [p.name for p in checkpoints(run)] == ["checkpoint-1"]
    resumed = launch([WORKER, "ppo_resume", tmp_path, "1"], timeout=600)
    _check(resumed)
    r0, r1 = _ranks(tmp_path)
    assert r0["resumed_steps"] == r1["resumed_steps"] == 3 and r0["critic_sharded"] and r1["critic_sharded"]
    for step in (2, 3):  # the resumed run's checkpoints are whole, the marker last
        assert checkpoint_problem(run / f"checkpoint-{step}", require=(STATE_MARKER,)) is None
    assert last_complete_checkpoint(run, require=(STATE_MARKER,)) == str(run / "checkpoint-3")


@pytest.mark.distributed
def test_the_marker_waits_for_every_process_so_a_rank_dying_after_the_trainers_files_leaves_none(tmp_path,
                                                                                                 tiny_debug_path):
    """SafeGRPO has no collective in its own on_save: process 1 dies after the Trainer's files with its
    rng_state_1.pth cut in half, before the package's callbacks. Without the barrier in CheckpointStateCallback
    process 0 wrote the marker anyway (seen before the fix), and every resume would load the broken RNG file."""
    from trl_safeppo.pipeline.checkpoints import STATE_MARKER, checkpoint_problem, last_complete_checkpoint

    run = tmp_path / "run"
    died = launch([WORKER, "grpo_die", tmp_path, "2"], timeout=600)
    assert died.returncode != 0 and "exitcode  : 17" in died.stderr
    second = run / "checkpoint-2"
    rng_1, rng_0 = (second / "rng_state_1.pth").stat().st_size, (second / "rng_state_0.pth").stat().st_size
    assert rng_1 < rng_0  # the half-written file is there (the two are of about equal size when whole)
    assert (second / "trainer_state.json").is_file() and not (second / STATE_MARKER).exists()
    assert checkpoint_problem(second, require=(STATE_MARKER,)) == (
        f"no {STATE_MARKER} (killed while the trainer added its own state)")
    assert last_complete_checkpoint(run, require=(STATE_MARKER,)) == str(run / "checkpoint-1")
