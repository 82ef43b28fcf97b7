"""The prepared GPU check (issue 20.6): a few steps each of SafePPO (bf16, one process and FSDP2 with one process),
fp16 PPO, SafeGRPO and SafeDPO on a locally built, randomly initialised Qwen2-style model of about 0.5B parameters
(Qwen2.5-0.5B's configuration, built with `AutoModelForCausalLM.from_config`; the tokenizer is tiny://debug's, built
locally: nothing is downloaded). For every case it prints generated tokens/s (PPO, GRPO) or trained tokens/s (DPO),
peak GPU memory, and the share of step time spent inside the models, and writes the figures to `--out` (default
`$OUT/gpu_check.json` when `$OUT` is set).

    bash benchmarks/gpu_check.sh                                   # on the lent H200: every case, ~0.5B model
    bash benchmarks/gpu_check.sh --only ppo_bf16,grpo_bf16 --steps 2
    python -m benchmarks.gpu_check --model-size tiny --device cpu --only ppo_fp32,grpo_fp32,dpo_fp32 --steps 2
    python -m benchmarks.gpu_check --dry-run                        # print the plan and exit

Each case runs in a fresh process (FSDP2 through `accelerate launch` with recipes/accelerate/fsdp2.yaml and one
process), so that peak memory is its own and one failure does not stop the others: a failed or refused case is
recorded with its error and the check goes on. The budget is 8 minutes for all cases; `--budget-seconds` lowers it,
and a case that cannot start inside it is skipped and recorded as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (trainer, precision, launcher)
CASES = {
    "ppo_bf16": ("ppo", "bf16", "single"),
    "ppo_fsdp2_bf16": ("ppo", "bf16", "fsdp2"),
    "ppo_fp16": ("ppo", "fp16", "single"),
    "grpo_bf16": ("grpo", "bf16", "single"),
    "dpo_bf16": ("dpo", "bf16", "single"),
    # CPU smoke cases (bf16 / fp16 autocast and FSDP need a GPU here)
    "ppo_fp32": ("ppo", "fp32", "single"),
    "grpo_fp32": ("grpo", "fp32", "single"),
    "dpo_fp32": ("dpo", "fp32", "single"),
}
GPU_DEFAULT = ["ppo_bf16", "ppo_fsdp2_bf16", "ppo_fp16", "grpo_bf16", "dpo_bf16"]
CPU_DEFAULT = ["ppo_fp32", "grpo_fp32", "dpo_fp32"]
MODEL_SIZES = ("0.5b", "tiny")
# Qwen2.5-0.5B's config.json (494M parameters with the tied 151936 x 896 embedding)
QWEN2_0_5B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
)
BUDGET_SECONDS = 8 * 60


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None,
                   help=f"comma-separated cases, from {', '.join(CASES)} (default: {','.join(GPU_DEFAULT)} on a GPU, "
                   f"{','.join(CPU_DEFAULT)} on the CPU)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per case, the first one untimed (>= 2)")
    p.add_argument("--model-size", default="0.5b", choices=MODEL_SIZES,
                   help="0.5b: Qwen2.5-0.5B's config, random weights; tiny: tiny://debug")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda when available")
    p.add_argument("--batch", type=int, default=16, help="completions (PPO/GRPO) or pairs (DPO) per optimizer step")
    p.add_argument("--max-completion-length", type=int, default=128, help="generated tokens per completion at most")
    p.add_argument("--budget-seconds", type=float, default=BUDGET_SECONDS, help="wall-clock budget for all cases")
    p.add_argument("--out", default=None, help="JSON file of the figures (default: $OUT/gpu_check.json if $OUT is set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if _cuda_available() else "cpu"
    if args.only is None:
        args.cases = GPU_DEFAULT if args.device == "cuda" else CPU_DEFAULT
    else:
        args.cases = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = [c for c in args.cases if c not in CASES]
        if unknown or not args.cases:
            p.error(f"--only={args.only!r}: unknown case(s) {unknown}; accepted: {', '.join(CASES)}")
    if args.steps < 2:
        p.error(f"--steps={args.steps}: use at least 2 (the first step is warm-up and is not timed)")
    if args.batch < 2 or args.batch % 2:
        p.error(f"--batch={args.batch}: use an even number >= 2 (GRPO draws 2 completions per prompt)")
    if args.max_completion_length < 1:
        p.error(f"--max-completion-length={args.max_completion_length}: use at least 1")
    if args.device == "cpu":
        needs_gpu = [c for c in args.cases if CASES[c][1] != "fp32" or CASES[c][2] == "fsdp2"]
        if needs_gpu:
            p.error(f"--device cpu cannot run {needs_gpu}: bf16/fp16 mixed precision and accelerate's FSDP need a "
                    f"GPU here; on the CPU use {', '.join(CPU_DEFAULT)}")
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "gpu_check.json")
    return args


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def plan(args: argparse.Namespace) -> list[dict]:
    """One worker config per case."""
    return [
        {
            "case": name, "trainer": CASES[name][0], "precision": CASES[name][1], "launcher": CASES[name][2],
            "steps": args.steps, "device": args.device, "batch": args.batch,
            "max_completion_length": args.max_completion_length, "seed": args.seed,
        }
        for name in args.cases
    ]


def build_model(size: str, root: Path) -> str:
    """A local model directory: Qwen2.5-0.5B's config with random weights (seed 0), or tiny://debug itself."""
    from trl_safeppo.models import resolve_model_path

    tiny = resolve_model_path("tiny://debug")
    if size == "tiny":
        return tiny
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = Qwen2Config(**QWEN2_0_5B, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
    )
    out = root / "qwen2-0.5b-random"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def command(config: dict) -> list[str]:
    worker = ["-m", "benchmarks._gpu_check_worker", json.dumps(config)]
    if config["launcher"] == "fsdp2":
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "recipes/accelerate/fsdp2.yaml"), "--num_processes", "1", *worker]
    return [sys.executable, *worker]


def run_case(config: dict, timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
           "WANDB_DISABLED": "true"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command(config), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": config["case"], "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("GPU-CHECK-RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        return {"case": config["case"], "status": "failed", "exit": proc.returncode, "error": tail,
                "process_wall_s": wall}
    result = json.loads(lines[-1][len("GPU-CHECK-RESULT "):])
    result.update(status="ok", process_wall_s=wall)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = plan(args)
    print(f"gpu_check: model {args.model_size}, device {args.device}, {args.steps} steps per case "
          f"(first untimed), batch {args.batch}, completions <= {args.max_completion_length} tokens, "
          f"budget {args.budget_seconds:.0f} s, out {args.out or '-'}")
    for c in configs:
        how = "accelerate launch, fsdp2.yaml, 1 process" if c["launcher"] == "fsdp2" else "one process"
        print(f"  {c['case']:<16} {c['trainer']:<5} {c['precision']:<5} {how}")
    if args.dry_run:
        return 0

    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    results = []
    try:
        model = build_model(args.model_size, root)
        print(f"model built in {time.perf_counter() - start:.0f} s: {model}", flush=True)
        for c in configs:
            left = args.budget_seconds - (time.perf_counter() - start)
            if left < 30:
                results.append({"case": c["case"], "status": "skipped", "error": "out of the time budget"})
                continue
            res = run_case({**c, "model": model}, timeout=left)
            results.append(res)
            print(_line(res), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"model_size": args.model_size, "device": args.device, "steps": args.steps, "batch": args.batch,
              "max_completion_length": args.max_completion_length, "wall_s": time.perf_counter() - start,
              "cases": results}
    if args.out:
        from trl_safeppo.fileio import write_json

        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"  {r['case']:<16} {r['status'].upper()}: {r.get('error', '')}"
    return (f"  {r['case']:<16} {r['tokens_per_s']:9.0f} {r['tokens_kind']} tokens/s  "
            f"{r['s_per_step']:6.2f} s/step  peak {r['peak_memory_gib']:6.2f} GiB ({r['memory_kind']})  "
            f"in models {100 * r['model_share']:4.0f}%")


if __name__ == "__main__":
    sys.exit(main())
