"""The critic and the policy sharded with FSDP2 on 2 CPU processes (gloo), as SafePPOTrainer shards them
(trl_safeppo/trainers/sharding.py; issue 20.5). accelerate refuses FSDP without GPUs, so the worker
(_sharded_ppo_worker.py, under torchrun) stands in for the Accelerator and calls accelerate's own `fsdp2_prepare_model`
(the policy, as the Trainer's `accelerator.prepare` does) and `sharding.prepare_critic` (the critic) with the plugin of
recipes/accelerate/fsdp2.yaml, then runs PPO update steps with the package's maths (`rollout_targets`,
`clipped_value_loss`), clipping (`scaling.grad_norm_`, on DTensor gradients) and critic step
(`scaling.critic_optimizer_step`), against the same steps unsharded on the whole batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

REPO_PATH = os.pathsep.join(filter(None, [str(__import__("pathlib").Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))

from trl_safeppo.trainers.sharding import check_critic_sharding, full_model_state, is_sharded, load_full_state


@pytest.mark.distributed
def test_fsdp2_shards_policy_critic_and_adam_states_and_matches_unsharded_steps(tmp_path, tiny_debug_path):
    out = tmp_path / "figures.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_PATH}  # the workers import tests.*
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           "-m", "tests.trainers._sharded_ppo_worker", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    f = json.loads(out.read_text())
    for name in ("policy", "critic"):
        s = f[name]
        # (a) every parameter is a DTensor sharded on dim 0 over the 2 processes; process 0 holds about half of them
        assert s["all_dtensor"] and s["placements"] == ["(Shard(dim=0),)"]
        assert 0.4 * s["full_numel"] < s["local_numel"] < 0.6 * s["full_numel"]
        # the Adam moments are sharded the same way (the optimizer was built over the DTensor parameters)
        assert s["adam_states_dtensor"] and s["adam_local_numel"] == s["local_numel"]
    # (b) three PPO steps (AdamW, clipped at the global gradient norm) give the unsharded run's weights: the
    # sharded run differs only by the order of float sums (~1e-6), the steps themselves move weights by ~1e-2
    assert f["policy_moved"] > 1e-3
    assert f["policy_max_diff"] < 1e-4 and f["critic_max_diff"] < 1e-4
    for (p, c), (p_ref, c_ref) in zip(f["norms"], f["ref_norms"]):
        assert p == pytest.approx(p_ref, rel=1e-4) and c == pytest.approx(c_ref, rel=1e-4, abs=1e-6)
    assert max(p for p, _ in f["ref_norms"]) > 0.5  # the 0.5 clip acted at least once
    # checkpoint: the full critic state loads into a freshly sharded critic, Adam moments included (the next step is
    # identical), and saved with save_pretrained it is an ordinary transformers checkpoint
    assert f["resumed_is_sharded"] and f["resumed_critic_max_diff"] == 0.0
    assert f["after_resume_step_max_diff"] == 0.0 and f["after_resume_step_moved"] > 0
    assert f["saved_checkpoint_max_diff"] == 0.0


def test_unsharded_state_helpers_are_the_plain_state_dicts():
    import torch

    module = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert not is_sharded(module)
    state = full_model_state(module)
    fresh = torch.nn.Linear(2, 1)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    load_full_state(fresh, state, fresh_opt, opt.state_dict())
    torch.testing.assert_close(fresh.weight, module.weight)
    torch.testing.assert_close(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


class _Accelerator:
    def __init__(self, kind, fsdp2=False, num_processes=1):
        from accelerate.utils import DistributedType

        self.distributed_type = getattr(DistributedType, kind)
        self.is_fsdp2, self.num_processes = fsdp2, num_processes


def test_what_cannot_be_sharded_is_refused_with_the_fix():
    import torch

    check_critic_sharding(_Accelerator("MULTI_GPU"), torch.nn.Linear(2, 1))  # DDP: anything goes
    check_critic_sharding(_Accelerator("FSDP", fsdp2=True), None)  # the critic loads from a path: fine
    check_critic_sharding(_Accelerator("FSDP", fsdp2=True), torch.nn.Linear(2, 1))  # an object on the CPU: fine
    with pytest.raises(ValueError, match="fsdp_version: 1.*set fsdp_version: 2"):
        check_critic_sharding(_Accelerator("FSDP", fsdp2=False), None)
    on_meta = torch.nn.Linear(2, 1, device="meta")
    check_critic_sharding(_Accelerator("FSDP", fsdp2=True), on_meta)

    class OnGPU(torch.nn.Module):  # a module whose parameters report an accelerator device (no GPU here)
        def parameters(self, recurse=True):
            return iter([type("P", (), {"device": torch.device("cuda", 0)})()])

    with pytest.raises(ValueError, match=r"value_model: .*already on \['cuda'\].*critic_model_path"):
        check_critic_sharding(_Accelerator("FSDP", fsdp2=True), OnGPU())


TRAINER_SCRIPT = '''
import json, os, sys
from types import SimpleNamespace
import torch
from datasets import Dataset
from tests.trainers._sharded_ppo_worker import fsdp2_accelerator
from trl_safeppo.trainers.ppo_config import SafePPOConfig
from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer
from trl_safeppo.trainers.sharding import full_model_state, is_sharded, prepare_critic

class LengthReward:
    __name__ = "length_reward"
    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        return [len(ids) / 8.0 for ids in completion_ids]

out = sys.argv[1]
ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(32)]})

def trainer(max_steps):
    args = SafePPOConfig(
        output_dir=out, per_device_train_batch_size=2, max_completion_length=6, max_steps=max_steps, num_iterations=1,
        steps_per_generation=2, gradient_accumulation_steps=2, logging_steps=1, report_to=[], bf16=False,
        use_cpu=True, learning_rate=1e-3,
        save_strategy="steps", save_steps=2, gradient_checkpointing=False, disable_tqdm=True, seed=0,
    )
    t = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=ds)
    # the critic sharded as under accelerate's FSDP2 (prepare_critic), its optimizer rebuilt over the shards
    value_module = t.accelerator.unwrap_model(t.critic)
    t.critic = prepare_critic(fsdp2_accelerator(t.accelerator.process_index), value_module)
    t.critic_optimizer = t._create_critic_optimizer(t.critic, args.learning_rate)
    return t

t = trainer(2)
before = full_model_state(t.critic)
t.train()
after = full_model_state(t.critic)  # collective: full tensors on process 0
rank = t.accelerator.process_index
# tripwire rollback of a sharded critic: snapshot (full tensors, written by process 0), disturb, restore (every
# process its shards of the written snapshot)
from trl_safeppo.trainers.tripwires import restore_snapshot, save_snapshot
save_snapshot(t, os.path.join(out, "snapshot"))
with torch.no_grad():
    for p in t.critic.parameters():
        p.add_(1.0)
restore_snapshot(t, os.path.join(out, "snapshot"))
restored = full_model_state(t.critic)
result = {"sharded": is_sharded(t.critic),
          "grad_norms": [h["ppo/val/grad_norm"] for h in t.state.log_history if "ppo/val/grad_norm" in h]}
resumed = trainer(3)
resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
if rank == 0:
    from transformers import AutoModelForSequenceClassification
    moved = max(float((after[k] - before[k]).abs().max()) for k in after)
    result["rollback_diff"] = max(float((restored[k] - after[k]).abs().max()) for k in after)
    ckpt = os.path.join(out, "checkpoint-2")
    saved = AutoModelForSequenceClassification.from_pretrained(os.path.join(ckpt, "critic"), num_labels=1)
    saved_diff = max(float((v - after["model." + k]).abs().max()) for k, v in saved.state_dict().items())
    opt = torch.load(os.path.join(ckpt, "critic_optimizer.pt"), weights_only=False)
    exp_avg = [s["exp_avg"] for s in opt["state"].values()]
    result.update(moved=moved, saved_diff=saved_diff, optim_full=all(type(e) is torch.Tensor for e in exp_avg),
                  optim_numel=sum(e.numel() for e in exp_avg),
                  critic_numel=sum(v.numel() for v in saved.state_dict().values()))
result["resumed_steps"] = resumed.state.global_step
result["resumed_sharded"] = is_sharded(resumed.critic)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
'''


@pytest.mark.distributed
def test_safe_ppo_trainer_with_an_fsdp2_critic_trains_rolls_back_checkpoints_and_resumes(
    two_process_results, tiny_debug_path
):
    # The trainer's own sharded-critic code (rollout values, DTensor-aware clipping and step, the full-tensor
    # checkpoint gather, the sharded resume) on 2 CPU processes; the policy stays DDP here (accelerate's FSDP needs a
    # GPU, see the module docstring).
    r0, r1 = two_process_results(TRAINER_SCRIPT)
    assert r0["sharded"] and r1["sharded"] and r0["resumed_sharded"]
    assert len(r0["grad_norms"]) == 2 and r0["grad_norms"] == r1["grad_norms"]  # one global norm, both processes
    assert r0["moved"] > 0
    assert r0["rollback_diff"] == 0.0  # a tripwire rollback restores the sharded critic exactly
    # critic/ is an ordinary checkpoint holding the full critic as trained; critic_optimizer.pt holds full tensors
    assert r0["saved_diff"] == 0.0
    assert r0["optim_full"] and r0["optim_numel"] == r0["critic_numel"]  # every weight has its full Adam moment
    assert r0["resumed_steps"] == r1["resumed_steps"] == 3


def test_a_sharded_critic_saved_on_each_node_is_refused_across_nodes(monkeypatch):
    # 2 nodes x 2 processes (torchrun sets LOCAL_WORLD_SIZE=2 of WORLD_SIZE=4): only the main process receives the
    # gathered critic, so node 2's local main would write an empty critic/ beside a marker that says "complete"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"save_on_each_node=True on several nodes.*set save_on_each_node=False"):
        check_critic_sharding(_Accelerator("FSDP", fsdp2=True, num_processes=4), None, save_on_each_node=True)
    check_critic_sharding(_Accelerator("FSDP", fsdp2=True, num_processes=4), None)  # one writer: fine
    check_critic_sharding(_Accelerator("MULTI_GPU", num_processes=4), None, save_on_each_node=True)  # DDP: full copies
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one node of 4: each node's main is the main process
    check_critic_sharding(_Accelerator("FSDP", fsdp2=True, num_processes=4), None, save_on_each_node=True)
