"""Synthetic run directories shaped like the runner's (docs/architecture.md, "Run directory"), with realistic
log histories using the trainers' real metric names (GRPO's, DPO's and SFT's), for testing the report alone."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

PROBES = ["What is 2 + 2?", "What is 57 + 68?", "Write a poem about the sea."]


def sft_history(steps: int = 20) -> list[dict]:
    out = []
    for step in range(1, steps + 1):
        out.append({"loss": 3.0 * math.exp(-step / 6) + 0.3, "mean_token_accuracy": 0.9 - 0.6 * math.exp(-step / 5),
                    "entropy": 2.5 * math.exp(-step / 8) + 0.4, "learning_rate": 3e-3, "grad_norm": 1.0,
                    "epoch": step / steps, "step": step})
    out.append({"train_runtime": 12.0, "train_loss": 1.0, "epoch": 1.0, "step": steps})
    return out


def grpo_history(steps: int = 30, *, flat: bool = False, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for step in range(1, steps + 1):
        progress = 0.0 if flat else 1 - math.exp(-step / 10)
        reward = 0.4 + 0.5 * progress + rng.uniform(-0.03, 0.03)
        mean_len = 18 - 4 * progress + rng.uniform(-1, 1)
        out.append({
            "loss": rng.uniform(-0.01, 0.01), "grad_norm": 0.5, "learning_rate": 1e-4,
            "reward": reward, "reward_std": 0.35 - 0.2 * progress,
            "rewards/accuracy_reward/mean": reward * 0.6, "rewards/format_reward/mean": min(1.0, reward * 1.2),
            "kl": 0.002 * step * (1 + progress), "beta": 0.02 * (1 + 0.5 * progress), "entropy": 1.2 - 0.5 * progress,
            "completions/mean_length": mean_len, "completions/min_length": mean_len - 6,
            "completions/max_length": min(24.0, mean_len + 6), "completions/clipped_ratio": max(0.0, 0.3 - 0.3 * progress),
            "frac_reward_zero_std": 0.1, "num_tokens": 1000.0 * step, "epoch": step / steps, "step": step,
        })
    out.append({"train_runtime": 30.0, "train_loss": 0.0, "epoch": 1.0, "step": steps})
    return out


def dpo_history(steps: int = 15) -> list[dict]:
    out = []
    for step in range(1, steps + 1):
        m = 1 - math.exp(-step / 5)
        out.append({"loss": 0.69 - 0.4 * m, "rewards/chosen": 0.3 * m, "rewards/rejected": -0.5 * m,
                    "rewards/margins": 0.8 * m, "rewards/accuracies": 0.5 + 0.4 * m, "logps/chosen": -20 + 2 * m,
                    "logps/rejected": -22 - 4 * m, "entropy": 0.9, "learning_rate": 5e-5, "epoch": step / steps,
                    "step": step})
    return out


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(root: Path, *, interrupted: bool = False, n_stages: int = 3) -> Path:
    """A demo-like run: sft -> grpo -> dpo, each with eval, probes and gates; grpo had a tripwire warning.

    interrupted=True: the dpo stage is 'running' with a cut-off last log line and no eval/probes/gates.
    n_stages < 3 keeps only the first stages (fewer figures: faster tests).
    """
    stages = [("sft", "sft", sft_history()), ("grpo", "grpo", grpo_history()), ("dpo", "dpo", dpo_history())]
    stages = stages[:n_stages]
    evals = [{"accuracy": 0.42, "mean_length": 17.5, "format_pass_rate": 0.5, "truncation_rate": 0.1, "n": 64},
             {"accuracy": 0.71, "mean_length": 13.2, "format_pass_rate": 0.97, "truncation_rate": 0.0, "n": 64},
             {"accuracy": 0.74, "mean_length": 12.9, "format_pass_rate": 0.98, "truncation_rate": 0.0, "n": 64}]
    answers = [["The answer is 4.", "<think>57 + 68 = 115</think><answer>115</answer>", "The answer is 7."],
               ["<think>2 + 2 = 4</think><answer>4</answer>", "<think>57 + 68 = 125</think><answer>125</answer>",
                "<think>the sea</think><answer>9</answer>"],
               ["<think>2 + 2 = 4</think><answer>4</answer>", "<think>57 + 68 = 125</think><answer>125</answer>",
                "<think>sea = 1</think><answer>1</answer>"]]
    manifest = {"name": "demo", "status": "running" if interrupted else "completed", "stages": []}
    for i, (name, kind, history) in enumerate(stages, start=1):
        d = root / "stages" / f"{i:02d}-{name}"
        last = interrupted and i == 3
        status = "running" if last else "completed"
        manifest["stages"].append({"index": i, "name": name, "type": kind, "status": status,
                                   "timings": {"duration_s": None if last else 10.5 * i}})
        if last:
            lines = "".join(json.dumps(r) + "\n" for r in history[:6]) + '{"loss": 0.5, "rewa'
            d.mkdir(parents=True)
            (d / "log_history.jsonl").write_text(lines)
            continue
        _write_jsonl(d / "log_history.jsonl", history)
        _write(d / "eval.json", dict(evals[i - 1], samples=[{"prompt": "What is 3 + 4?", "completion": answers[i - 1][0]}]))
        _write(d / "probes.json", [{"prompt": p, "completion": a} for p, a in zip(PROBES, answers[i - 1])])
        _write(d / "gates.json", [{"gate": "no_tripwire_stop", "passed": True, "reason": "no tripwire stopped the stage",
                                   "values": {}}])
        if kind == "grpo":
            _write_jsonl(d / "tripwires.jsonl", [{"step": 22, "detector": "length_collapse", "status": "warn",
                                                  "reason": "mean length fell 30% in 5 steps", "values": {},
                                                  "action": "warn"}])
    _write(root / "manifest.json", manifest)
    return root
