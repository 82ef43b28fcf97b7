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

from trl_safeppo.trainers.sharding import check_critic_sharding, full_model_state, is_sharded, load_full_state


@pytest.mark.distributed
def test_fsdp2_shards_policy_critic_and_adam_states_and_matches_unsharded_steps(tmp_path, tiny_debug_path):
    out = tmp_path / "figures.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    def __init__(self, kind, fsdp2=False):
        from accelerate.utils import DistributedType

        self.distributed_type = getattr(DistributedType, kind)
        self.is_fsdp2 = fsdp2


def test_what_cannot_be_sharded_is_refused_with_the_fix():
    import torch

    check_critic_sharding(_Accelerator("MULTI_GPU"), torch.nn.Linear(2, 1))  # DDP: anything goes
    check_critic_sharding(_Accelerator("FSDP", fsdp2=True), None)  # the critic loads from a path: fine
    check_critic_sharding(_Accelerator("FSDP", fsdp2=True), torch.nn.Linear(2, 1))  # an object on the CPU: fine
    with pytest.raises(ValueError, match="DeepSpeed.*fsdp2.yaml"):
        check_critic_sharding(_Accelerator("DEEPSPEED"), None)
    with pytest.raises(ValueError, match="fsdp_version: 1.*set fsdp_version: 2"):
        check_critic_sharding(_Accelerator("FSDP", fsdp2=False), None)
    on_meta = torch.nn.Linear(2, 1, device="meta")
    check_critic_sharding(_Accelerator("FSDP", fsdp2=True), on_meta)

    class OnGPU(torch.nn.Module):  # a module whose parameters report an accelerator device (no GPU here)
        def parameters(self, recurse=True):
            return iter([type("P", (), {"device": torch.device("cuda", 0)})()])

    with pytest.raises(ValueError, match=r"value_model: .*already on \['cuda'\].*critic_model_path"):
        check_critic_sharding(_Accelerator("FSDP", fsdp2=True), OnGPU())
