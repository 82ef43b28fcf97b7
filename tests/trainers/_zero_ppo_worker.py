"""Worker of test_deepspeed.py, run by `torchrun --nproc_per_node 2` on the CPU (DeepSpeed's CPU accelerator, gloo):
PPO update steps of a policy and a critic under DeepSpeed ZeRO (argv[2]: 2 or 3; argv[3]: micro-batches per step),
wired as SafePPOTrainer wires them, against the same steps unsharded (_sharded_ppo_worker's data, maths and
reference). Process 0 writes the figures as JSON to argv[1].

The policy's engine is built as accelerate builds it (`deepspeed.initialize` around the model and its optimizer), the
critic's by `zero.critic_engine` from the policy's config. One step is the Trainer's: per micro-batch one backward of
`(policy_loss + vf_coef * value_loss) / micro-batches` through the policy's engine (`scale_wrt_gas=False`, as
transformers passes it), the policy engine's step at the boundary (accelerate's `DeepSpeedEngineWrapper.backward`),
then the critic engine's step (`SafePPOTrainer._critic_optimizer_step`)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch

from tests.trainers._sharded_ppo_worker import (
    LR, MASK, MAX_NORM, P, SCORES, STEPS, T, VF_COEF, CLIP, CLIP_V, build, full, logps_of, max_diff, ppo_step,
)


def ds_config(stage: int, gas: int) -> dict:
    """The config accelerate's plugin holds for `--zero_stage N` once the Trainer filled its `auto` values."""
    return {"train_micro_batch_size_per_gpu": 2 // gas, "gradient_accumulation_steps": gas, "train_batch_size": 4,
            "gradient_clipping": MAX_NORM, "zero_optimization": {"stage": stage}, "bf16": {"enabled": False},
            "fp16": {"enabled": False}, "steps_per_print": 10**9}


def gathered(module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the module's parameters (ZeRO-3: gathered on every rank)."""
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: v.detach().clone() for k, v in params.items()}


def zero_step(policy, critic, batch, gas: int):
    """One optimizer step over `gas` micro-batches of this process's rows (each row has 4 valid tokens, so the mean
    of the micro-batches' token means is the token mean of the step), as the Trainer and accelerate run it."""
    from trl_safeppo.trainers.ppo_maths import clipped_value_loss

    n = batch["input_ids"].size(0) // gas
    for i in range(gas):
        mb = {k: v[i * n : (i + 1) * n] for k, v in batch.items()}
        ids, attn, mask = mb["input_ids"], mb["attention_mask"], mb["mask"]
        ratio = torch.exp(logps_of(policy, ids, attn) - mb["old_logps"])
        adv = mb["advantages"]
        pg = -torch.min(ratio * adv, torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv)
        policy_loss = (pg * mask).sum() / mask.sum()
        vpred = critic(input_ids=ids, attention_mask=attn)[:, P - 1 : -1]
        vf_loss, _ = clipped_value_loss(vpred, mb["values"], mb["returns"], mask, CLIP_V)
        sync = i == gas - 1
        for engine in (policy, critic):  # accelerate's DeepSpeedEngineWrapper; SafePPOTrainer.training_step
            engine.set_gradient_accumulation_boundary(sync)
        policy.backward((policy_loss + VF_COEF * vf_loss) / gas, scale_wrt_gas=False)  # the Trainer divides by gas
        if sync:
            policy.step()
    critic.step()
    return float(policy.get_global_grad_norm()), float(critic.get_global_grad_norm())


def main(out_path: str, stage: int, gas: int) -> None:
    import deepspeed
    import torch.distributed as dist

    from trl_safeppo.models import resolve_model_path
    from trl_safeppo.trainers.ppo_maths import rollout_targets
    from trl_safeppo.trainers.zero import critic_engine

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    path = resolve_model_path("tiny://debug")

    # The rollout and the unsharded reference, exactly as in _sharded_ppo_worker
    policy, critic = build(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, policy.config.vocab_size, (4, P + T), generator=g)
    attn = torch.ones_like(ids)
    mask = torch.tensor(MASK, dtype=torch.float32)
    with torch.no_grad():
        old_logps = logps_of(policy, ids, attn)
        values = critic(input_ids=ids, attention_mask=attn)[:, P - 1 : -1]
    ref_logps = old_logps + 0.1 * torch.randn(old_logps.shape, generator=g)
    targets = rollout_targets(torch.tensor(SCORES), old_logps, ref_logps, values, mask, kl_coef=0.05, gamma=1.0,
                              lam=0.95)
    batch = {"input_ids": ids, "attention_mask": attn, "mask": targets.mask, "old_logps": old_logps,
             "advantages": targets.advantages, "values": values, "returns": targets.returns}
    local = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    opt_p = torch.optim.AdamW(policy.parameters(), lr=LR)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=LR)
    ref_norms = [ppo_step(policy, critic, opt_p, opt_c, batch) for _ in range(STEPS)]
    ref_policy, ref_critic = full(policy), full(critic)

    # ZeRO: fresh models, the policy's engine as accelerate builds it, the critic's as SafePPOTrainer does
    config = ds_config(stage, gas)
    z_policy, z_critic = build(path)
    opt_zc = torch.optim.AdamW(z_critic.parameters(), lr=LR)
    policy_engine, *_ = deepspeed.initialize(model=z_policy, optimizer=torch.optim.AdamW(z_policy.parameters(), lr=LR),
                                             config=config)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    engine = critic_engine(accelerator, z_critic, opt_zc)
    norms = [zero_step(policy_engine, engine, local, gas) for _ in range(STEPS)]

    def partition(module, optimizer):
        params = list(module.parameters())
        return {
            "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
            "adam_local_numel": sum(s["exp_avg"].numel() for s in optimizer.state.values() if "exp_avg" in s),
        }

    figures = {"stage": engine.zero_optimization_stage(), "norms": norms, "ref_norms": ref_norms,
               "critic": partition(engine.module, opt_zc),
               "policy": partition(policy_engine.module, policy_engine.optimizer.optimizer)}
    z_policy_state, z_critic_state = gathered(policy_engine.module), gathered(engine.module)  # collectives
    if rank == 0:
        # parameters only (a state dict also holds tied weights twice and buffers)
        figures["policy_max_diff"] = max_diff(z_policy_state, {k: ref_policy[k] for k in z_policy_state})
        figures["critic_max_diff"] = max_diff(z_critic_state, {k: ref_critic[k] for k in z_critic_state})
        figures["policy_moved"] = max_diff(ref_policy, full(build(path)[0]))
        with open(out_path, "w") as f:
            json.dump(figures, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
