"""SafeGRPOTrainer's KL trust region (rails.kl.max_kl) and pull-back (rails.kl.pull_back_above) under `accelerate
launch --multi_gpu --num_processes 2` (gloo on CPU): the line search and the bisection measure the KL over both
processes' batches, so both ranks accept the same step scale and the same alpha, and the DDP replicas stay
identical while the cap scales steps back and the pull-back moves them towards the reference."""

from __future__ import annotations

import textwrap

import pytest

SCRIPT = textwrap.dedent(
    '''
    import json, os, sys
    from datasets import Dataset
    from trl_safeppo import SafeGRPOConfig, SafeGRPOTrainer

    class CharLength:
        __name__ = "char_length"
        def __call__(self, prompts, completions, **kwargs):
            return [float(len(c[0]["content"])) for c in completions]

    KL = __KL__
    out = sys.argv[1]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(32)]})
    args = SafeGRPOConfig(
        output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=3,
        steps_per_generation=2, gradient_accumulation_steps=2, logging_steps=1, report_to=[], use_cpu=True,
        learning_rate=1e-2, save_strategy="no", disable_tqdm=True, seed=0,
        rails={"kl": {"controller": "fixed", "init_kl_coef": 0.1, **KL}},
    )
    trainer = SafeGRPOTrainer(model="tiny://debug", reward_funcs=CharLength(), args=args, train_dataset=ds)
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "world": trainer.accelerator.num_processes,
        "policy_sum": float(sum(p.double().sum() for p in policy.parameters())),
        "tokens": trainer.state.num_input_tokens_seen,
        "kl": [h["kl"] for h in logs],
        "scales": [h.get("kl/trust_region/scale") for h in logs],
        "kl_after": [h.get("kl/trust_region/kl_after") for h in logs],
        "kl_before": [h.get("kl/trust_region/kl_before") for h in logs],
        "alphas": [h["kl/pull_back/alpha"] for h in logs],
        "pulled_kl": [h["kl/pull_back/kl_after"] for h in logs],
    }
    with open(os.path.join(out, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    '''
)


@pytest.mark.distributed
def test_kl_trust_region_and_pull_back_agree_across_two_processes(two_process_results, tiny_debug_path):
    kl = {"max_kl": 2e-3, "max_kl_backtracks": 6, "pull_back_above": 1e-3, "pull_back_to": 5e-4}
    r0, r1 = two_process_results(SCRIPT.replace("__KL__", repr(kl)))
    assert r0["world"] == r1["world"] == 2
    # one KL over both processes (2 micro-batches of 4 completions each per optimizer step): the same scales and
    # KLs on both ranks, so the same weights
    assert r0["scales"] == r1["scales"] and r0["kl_after"] == r1["kl_after"]
    assert any(s < 1 for s in r0["scales"]), r0  # the cap bound: steps were scaled back
    assert r0["policy_sum"] == pytest.approx(r1["policy_sum"], rel=1e-9), "DDP policies diverged"
    for before, after in zip(r0["kl_before"], r0["kl_after"], strict=True):
        assert after <= max(2e-3, before)
    # the pull-back runs after the line search, on its result: the same alphas on both ranks; where it acted
    # (the capped step still above 1e-3), it landed at or under 5e-4
    assert r0["alphas"] == r1["alphas"] and r0["pulled_kl"] == r1["pulled_kl"]
    assert any(a < 1 for a in r0["alphas"]), r0
    for alpha, capped, pulled in zip(r0["alphas"], r0["kl_after"], r0["pulled_kl"], strict=True):
        assert (pulled <= 5e-4 and capped > 1e-3) if alpha < 1 else (pulled == capped <= 1e-3)
