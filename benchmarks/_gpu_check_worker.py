"""One case of benchmarks/gpu_check.py, in its own process (or under `accelerate launch` for FSDP2).

Usage (by gpu_check.py): python -m benchmarks._gpu_check_worker '<json config>'
Prints `GPU-CHECK-RESULT {json}` as its last line (process 0 only).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time


class LengthReward:
    """Picklable rule: completion length / max length (every completion is scored)."""

    __name__ = "length_reward"

    def __init__(self, max_len: int):
        self.max_len = max_len

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        return [len(ids) / self.max_len for ids in completion_ids]


def _prompts(n: int):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + {i % 7}?"}] for i in range(n)]})


def _pairs(n: int, words: int):
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [f"What is {i} + 1? " for i in range(n)],
        "chosen": [" ".join([f"The answer is {i + 1}."] * max(1, words // 4)) for i in range(n)],
        "rejected": [" ".join([f"Maybe {i + 7}, not sure."] * max(1, words // 4)) for i in range(n)],
    })


def main(cfg: dict) -> None:
    import torch
    from transformers import TrainerCallback

    from benchmarks._harness import ModelTimer
    from trl_safeppo import SafeDPOConfig, SafeDPOTrainer, SafeGRPOConfig, SafeGRPOTrainer
    from trl_safeppo.trainers.ppo_config import SafePPOConfig
    from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer

    cuda = cfg["device"] == "cuda"
    batch, steps, max_len = cfg["batch"], cfg["steps"], cfg["max_completion_length"]
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"gpu_check-{cfg['case']}-"), max_steps=steps, logging_steps=1,
        report_to=[], save_strategy="no", seed=cfg["seed"], disable_tqdm=True, use_cpu=not cuda,
        bf16=cfg["precision"] == "bf16", fp16=cfg["precision"] == "fp16", learning_rate=1e-6,
        activation_checkpointing=False, per_device_train_batch_size=batch,
    )
    model = cfg["model"]
    if cfg["trainer"] == "ppo":
        args = SafePPOConfig(**common, num_generations=1, steps_per_generation=1, num_iterations=1,
                             max_completion_length=max_len)
        trainer = SafePPOTrainer(model=model, reward_funcs=LengthReward(max_len), args=args,
                                 train_dataset=_prompts(batch * steps))
    elif cfg["trainer"] == "grpo":
        args = SafeGRPOConfig(**common, num_generations=2, steps_per_generation=1, num_iterations=1, beta=0.05,
                              max_completion_length=max_len)
        trainer = SafeGRPOTrainer(model=model, reward_funcs=LengthReward(max_len), args=args,
                                  train_dataset=_prompts(batch * steps))
    else:
        args = SafeDPOConfig(**common, max_length=max_len + 64)  # prompt (~10 tokens) + a response of ~max_len
        trainer = SafeDPOTrainer(model=model, args=args, train_dataset=_pairs(batch * steps, max_len // 2))

    timer = ModelTimer()
    timer.install(trainer)
    trained_tokens = [0]

    def count(module, args_, kwargs):
        ids = kwargs.get("input_ids", args_[0] if args_ else None)
        if module.training and torch.is_grad_enabled() and ids is not None:
            trained_tokens[0] += int(ids.numel())

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)

    class Marks(TrainerCallback):
        def __init__(self):
            self.marks = []  # (wall time, seconds inside the models, trained tokens) at the start and each step end

        def on_train_begin(self, *a, **k):
            self.marks.append((time.perf_counter(), timer.seconds, trained_tokens[0]))

        def on_step_end(self, *a, **k):
            self.marks.append((time.perf_counter(), timer.seconds, trained_tokens[0]))

    marks = Marks()
    trainer.add_callback(marks)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    timed = marks.marks[1:]  # from the end of the first (warm-up) step
    seconds = timed[-1][0] - timed[0][0]
    in_models = timed[-1][1] - timed[0][1]
    n_timed = len(timed) - 1
    if cfg["trainer"] in ("ppo", "grpo"):
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
        per_step = statistics.mean(lengths[1:]) * batch if len(lengths) > 1 else float("nan")
        tokens, kind = per_step * n_timed, "generated"
    else:
        tokens, kind = timed[-1][2] - timed[0][2], "trained"
    if cuda:
        peak, memory_kind = torch.cuda.max_memory_allocated() / 2**30, "max allocated, GPU"
    else:
        import resource

        peak, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "max RSS, CPU"
    n_params = sum(p.numel() for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
    result = {
        "case": cfg["case"], "trainer": cfg["trainer"], "precision": cfg["precision"], "launcher": cfg["launcher"],
        "policy_parameters": n_params, "timed_steps": n_timed, "s_per_step": seconds / max(n_timed, 1),
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"), "tokens_kind": kind,
        "peak_memory_gib": peak, "memory_kind": memory_kind, "model_share": in_models / seconds if seconds else 0.0,
        "model_seconds_by_kind": timer.by_kind, "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
    }
    if trainer.accelerator.is_main_process:
        print("GPU-CHECK-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
