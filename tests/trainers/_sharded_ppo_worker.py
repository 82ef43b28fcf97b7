"""Worker of test_sharding.py, run by `torchrun --nproc_per_node 2` on the CPU (gloo): PPO update steps of a policy
and a critic sharded with torch's FSDP2 (`fully_shard`, DTensor parameters) against the same steps unsharded.

Process 0 writes the figures as JSON to argv[1]. Not collected by pytest (the name starts with an underscore).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist

STEPS = 3
LR = 2e-3
MAX_NORM = 0.5  # small enough to clip: the clip uses the global norm of the sharded gradients
VF_COEF, CLIP, CLIP_V = 0.1, 0.2, 0.2
P, T = 3, 6  # prompt and completion tokens
# every row has 4 valid completion tokens (holes allowed), so each process's token mean over its 2 rows, averaged
# over the 2 processes by FSDP's gradient reduction, is the token mean over all 4 rows of the unsharded step
MASK = [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 0]]
SCORES = [1.0, -1.0, 0.5, 2.0]


def build(path: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from trl_safeppo.trainers.critic import ValueModel

    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)  # the critic's fresh value head
    critic = ValueModel(AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32))
    return policy, critic


def fsdp2_accelerator(rank: int):
    """What accelerate's `fsdp2_prepare_model` reads of an Accelerator, with the plugin recipes/accelerate/fsdp2.yaml
    makes (FSDP2, TRANSFORMER_BASED_WRAP, reshard after forward, rank 0's weights broadcast at load). accelerate
    itself refuses FSDP on a machine without GPUs, so the Accelerator is stood in for; the sharding code is its own."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        cpu_ram_efficient_loading=True, state_dict_type="FULL_STATE_DICT",
    )
    return SimpleNamespace(is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                           mixed_precision="no", is_main_process=rank == 0, device=torch.device("cpu"))


def shard(accelerator, policy, critic):
    """The policy as the Trainer's `accelerator.prepare` shards it (`fsdp2_prepare_model`), the critic as
    SafePPOTrainer does (`sharding.prepare_critic`)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from trl_safeppo.trainers.sharding import prepare_critic

    return fsdp2_prepare_model(accelerator, policy), prepare_critic(accelerator, critic)


def logps_of(policy, input_ids, attention_mask):
    logits = policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, P - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, P:].unsqueeze(-1)).squeeze(-1)


def ppo_step(policy, critic, opt_p, opt_c, batch):
    from trl_safeppo.trainers.ppo_maths import clipped_value_loss
    from trl_safeppo.trainers.scaling import critic_optimizer_step, grad_norm_

    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["mask"]
    # Policy loss: the clipped surrogate (GRPO's loss), token mean
    ratio = torch.exp(logps_of(policy, ids, attn) - batch["old_logps"])
    adv = batch["advantages"]
    pg = -torch.min(ratio * adv, torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv)
    policy_loss = (pg * mask).sum() / mask.sum()
    # Value loss
    vpred = critic(input_ids=ids, attention_mask=attn)[:, P - 1 : -1]
    vf_loss, _ = clipped_value_loss(vpred, batch["values"], batch["returns"], mask, CLIP_V)
    (policy_loss + VF_COEF * vf_loss).backward()
    norm_p = grad_norm_(policy.parameters(), MAX_NORM)
    opt_p.step()
    opt_p.zero_grad(set_to_none=True)
    norm_c, stepped = critic_optimizer_step(SimpleNamespace(scaler=None), list(critic.parameters()), opt_c, MAX_NORM)
    opt_c.zero_grad(set_to_none=True)
    assert stepped
    return float(norm_p), float(norm_c)


def full(module) -> dict[str, torch.Tensor]:
    from trl_safeppo.trainers.sharding import full_model_state

    return full_model_state(module)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(out_path: str) -> None:
    from torch.distributed.tensor import DTensor

    from trl_safeppo.models import resolve_model_path
    from trl_safeppo.trainers.ppo_maths import rollout_targets
    from trl_safeppo.trainers.sharding import full_optimizer_state, is_sharded, load_full_state

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    accelerator = fsdp2_accelerator(rank)
    path = resolve_model_path("tiny://debug")

    # The rollout: fixed tokens, rollout-time log-probs and values of the initial models, PPO targets on all rows
    policy, critic = build(path)
    g = torch.Generator().manual_seed(1)
    vocab = policy.config.vocab_size
    ids = torch.randint(3, vocab, (4, P + T), generator=g)
    attn = torch.ones_like(ids)
    mask = torch.tensor(MASK, dtype=torch.float32)
    with torch.no_grad():
        old_logps = logps_of(policy, ids, attn)
        values = critic(input_ids=ids, attention_mask=attn)[:, P - 1 : -1]
    ref_logps = old_logps + 0.1 * torch.randn(old_logps.shape, generator=g)
    targets = rollout_targets(
        torch.tensor(SCORES), old_logps, ref_logps, values, mask, kl_coef=0.05, gamma=1.0, lam=0.95
    )
    batch = {"input_ids": ids, "attention_mask": attn, "mask": targets.mask, "old_logps": old_logps,
             "advantages": targets.advantages, "values": values, "returns": targets.returns}
    rows = slice(2 * rank, 2 * rank + 2)
    local = {k: v[rows] for k, v in batch.items()}

    # Unsharded reference: the full batch, one process's plain models
    opt_p = torch.optim.AdamW(policy.parameters(), lr=LR)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=LR)
    ref_norms = [ppo_step(policy, critic, opt_p, opt_c, batch) for _ in range(STEPS)]
    ref_policy, ref_critic = full(policy), full(critic)

    # Sharded: fresh models, FSDP2 over 2 processes, each process its 2 rows
    s_policy, s_critic = shard(accelerator, *build(path))
    s_opt_p = torch.optim.AdamW(s_policy.parameters(), lr=LR)  # built after sharding: states sharded
    s_opt_c = torch.optim.AdamW(s_critic.parameters(), lr=LR)
    norms = [ppo_step(s_policy, s_critic, s_opt_p, s_opt_c, local) for _ in range(STEPS)]

    def shard_figures(module, optimizer):
        params = list(module.parameters())
        local_numel = sum(p.to_local().numel() for p in params if isinstance(p, DTensor))
        full_numel = sum(p.numel() for p in params)
        states = [s["exp_avg"] for s in optimizer.state.values()]
        return {
            "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "placements": sorted({str(p.placements) for p in params if isinstance(p, DTensor)}),
            "local_numel": local_numel, "full_numel": full_numel,
            "adam_states_dtensor": bool(states) and all(isinstance(s, DTensor) for s in states),
            "adam_local_numel": sum(s.to_local().numel() for s in states if isinstance(s, DTensor)),
        }

    figures = {"policy": shard_figures(s_policy, s_opt_p), "critic": shard_figures(s_critic, s_opt_c)}
    figures["norms"], figures["ref_norms"] = norms, ref_norms
    sharded_policy, sharded_critic = full(s_policy), full(s_critic)  # collective; full tensors on process 0 only
    if rank == 0:
        figures["policy_max_diff"] = max_diff(sharded_policy, ref_policy)
        figures["critic_max_diff"] = max_diff(sharded_critic, ref_critic)
        figures["policy_moved"] = max_diff(ref_policy, full(build(path)[0]))

    # Checkpoint: full tensors out of the sharded critic and its optimizer (process 0), shared as a checkpoint file
    # would be, loaded into a freshly sharded critic and optimizer
    shared = [full(s_critic), full_optimizer_state(s_critic, s_opt_c)]  # collectives
    dist.broadcast_object_list(shared, src=0)
    critic_state, optim_state = shared
    _, resumed = shard(accelerator, *build(path))
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=LR)
    load_full_state(resumed, critic_state, resumed_opt, optim_state)
    figures["resumed_is_sharded"] = is_sharded(resumed) and is_sharded(s_critic)
    resumed_state = full(resumed)
    # one more identical step from the original and from the resumed state (Adam moments restored): same critic
    for c, o in ((s_critic, s_opt_c), (resumed, resumed_opt)):
        ppo_step_critic_only(c, o, local)
    after_original, after_resumed = full(s_critic), full(resumed)
    if rank == 0:
        from transformers import AutoModelForSequenceClassification

        figures["resumed_critic_max_diff"] = max_diff(resumed_state, critic_state)
        figures["after_resume_step_max_diff"] = max_diff(after_resumed, after_original)
        figures["after_resume_step_moved"] = max_diff(after_original, critic_state)
        # an ordinary checkpoint: the full critic state saved with save_pretrained, loaded back by transformers
        with tempfile.TemporaryDirectory() as tmp:
            hf = build(path)[1].model
            hf.load_state_dict({k[len("model."):]: v for k, v in critic_state.items() if k.startswith("model.")})
            hf.save_pretrained(tmp)
            loaded = AutoModelForSequenceClassification.from_pretrained(tmp, num_labels=1)
            expected = {"model." + k: v for k, v in loaded.state_dict().items()}
            figures["saved_checkpoint_max_diff"] = max_diff(
                expected, {k: v for k, v in critic_state.items() if k.startswith("model.")}
            )
        with open(out_path, "w") as f:
            json.dump(figures, f)
    dist.barrier()
    dist.destroy_process_group()


def ppo_step_critic_only(critic, opt, batch):
    from trl_safeppo.trainers.ppo_maths import clipped_value_loss
    from trl_safeppo.trainers.scaling import critic_optimizer_step

    vpred = critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:, P - 1 : -1]
    loss, _ = clipped_value_loss(vpred, batch["values"], batch["returns"], batch["mask"], CLIP_V)
    loss.backward()
    critic_optimizer_step(SimpleNamespace(scaler=None), list(critic.parameters()), opt, MAX_NORM)
    opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
