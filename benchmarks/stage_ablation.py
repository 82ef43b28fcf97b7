"""Stage ablation: the demo recipe's chain with each training stage removed in turn (full, no PPO, no GRPO,
no RS-SFT, no DPO), on several seeds: does every stage pay on the embedded arithmetic task?

Per seed, the whole recipe runs once (``python -m trl_safeppo run RECIPE seed=S output_dir=...``, resumable), and
each variant reuses the full chain's stages before the one it removes: a variant starts from the full run's model
after the last training stage before the removed one and reruns everything after it except the removed stage. So
SFT runs once per seed, every variant starts from the same warm start (fairer than separate SFTs), and no prefix
is trained twice. ``no RS-SFT`` removes the SFT on the kept samples but keeps rejection sampling, which DPO's pairs
come from.

Each variant's final policy is scored the same way: greedy held-out accuracy (and, beside a strict accuracy rule,
the answer-only accuracy), format pass and mean length on the recipe's whole eval split (the recipe's eval
settings), and KL(policy || SFT model) in nats per completion, estimated from completions sampled at temperature 1
on held-out prompts (mean over samples of the summed log-ratio of the sampled tokens, EOS included). Writes ``<out>/stage_ablation.json``, ``<out>/stage_ablation.md`` (the table)
and ``<out>/stage_ablation.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._harness import OFFLINE_ENV, REPO, machine, print_table, save_figure, write_json

TRAINING = ("sft", "ppo", "grpo", "dpo")  # stage types that change the policy
# variant -> the stage it removes (by name in the recipe); "full" removes nothing
VARIANTS = {"full": None, "no PPO": "ppo", "no GRPO": "grpo", "no RS-SFT": "sft-rs", "no DPO": "dpo"}


# ---------------------------------------------------------------------------------------------------------------
# Command line
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stage_ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"),
                        help="the chain to ablate (default recipes/demo.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="recipe seeds (default 0 1 2)")
    parser.add_argument("--seed", type=int, default=None, help="one seed (shorthand for --seeds S)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                        help=f"variants to run (default all: {', '.join(repr(v) for v in VARIANTS)})")
    parser.add_argument("--steps", type=int, default=None,
                        help="cap every training stage at this many optimizer steps (default: the recipe's budgets; "
                             "for a quick smoke run)")
    parser.add_argument("--full-run-dir", default=None,
                        help="the full run of each seed, a template with {seed} (default <out>/stage_ablation/"
                             "seed{seed}/full); an existing completed run of the same recipe is reused, not retrained")
    parser.add_argument("--kl-prompts", type=int, default=100, help="held-out prompts for the KL estimate (default 100)")
    parser.add_argument("--kl-samples", type=int, default=4, help="completions sampled per KL prompt (default 4)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where JSON/MD/PNG go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = parser.parse_args(argv)
    if args.seed is not None:
        args.seeds = [args.seed]
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Impossible settings fail before anything runs, naming the flag, its value and what is accepted."""
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown[0]!r}; accepted: {', '.join(repr(v) for v in VARIANTS)}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds={args.seeds}: a seed is repeated; give each seed once")
    for flag, value in (("--steps", args.steps), ("--kl-prompts", args.kl_prompts),
                        ("--kl-samples", args.kl_samples), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise SystemExit(f"{flag}={value}: must be >= 1")
    if args.full_run_dir is not None and len(args.seeds) > 1 and "{seed}" not in args.full_run_dir:
        raise SystemExit(f"--full-run-dir={args.full_run_dir!r}: several seeds need a template with {{seed}}, "
                         "e.g. runs/demo-s{seed}")
    if not Path(args.recipe).is_file():
        raise SystemExit(f"--recipe={args.recipe!r}: no such file")


# ---------------------------------------------------------------------------------------------------------------
# Recipes of the variants
def resolved_tree(recipe: str, overrides: list[str]) -> dict:
    """The recipe as a plain tree with overrides applied and ``${...}`` references resolved (a variant that drops
    the stage a reference points at keeps the value)."""
    import yaml

    from trl_safeppo.pipeline.recipe import apply_overrides, resolve_references

    tree = yaml.safe_load(Path(recipe).read_text())
    return resolve_references(apply_overrides(tree, overrides))


def stage_name(stage: dict) -> str:
    return stage.get("name") or stage["type"]


def plan_variant(stages: list[dict], removed: str | None) -> tuple[str | None, list[dict]]:
    """``(prefix, rest)`` of a variant: the name of the full chain's last training stage before the removed one
    (whose model the variant starts from; None when the removed stage is the first), and the stages the variant
    reruns after it (everything but the removed stage; eval stages dropped, the benchmark scores the final policy
    itself). The full chain is ``(None, [])``: nothing to rerun."""
    names = [stage_name(s) for s in stages]
    if removed is None:
        return None, []
    if removed not in names:
        raise SystemExit(f"the recipe has no stage named {removed!r} (its stages: {', '.join(names)})")
    k = names.index(removed)
    before = [i for i in range(k) if stages[i]["type"] in TRAINING]
    if not before:
        raise SystemExit(f"cannot remove {removed!r}: it is the first training stage (nothing to start from)")
    start = before[-1]
    rest = [s for i, s in enumerate(stages) if start < i and i != k and s["type"] != "eval"]
    first = next((j for j, s in enumerate(rest) if s["type"] in TRAINING), None)
    gate = rest[first].get("gate") if first is not None else None
    if gate and gate.get("on_fail") == "carry_previous":
        # the variant's first training stage has no previous stage to carry over (pre-flight refuses it): a failed
        # gate stops the variant instead, which is then scored on the model it started from, as carrying would
        rest[first] = {**rest[first], "gate": {**gate, "on_fail": "stop"}}
    return names[start], rest


def cap_steps(stages: list[dict], steps: int | None) -> list[str]:
    """``key.path=value`` overrides capping every training stage at ``steps`` optimizer steps."""
    if steps is None:
        return []
    return [f"stages.{stage_name(s)}.args.max_steps={steps}" for s in stages if s["type"] in TRAINING]


# ---------------------------------------------------------------------------------------------------------------
# Running
def run_cli(recipe: str, overrides: list[str], threads: int) -> float:
    """``python -m trl_safeppo run`` in a fresh process; returns its wall seconds. A run that a gate stopped (exit 1
    with a manifest) is a result, not an error: :func:`last_policy` reads where it stopped."""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "trl_safeppo", "run", recipe, *overrides]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 and "gate " not in proc.stdout:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


def finals(run_dir: Path) -> dict[str, dict]:
    """Stage name -> manifest entry of a run (each finished one with ``outputs.final.path``)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {s["name"]: s for s in manifest["stages"]}


def finished(entry: dict | None) -> bool:
    return bool(entry) and entry.get("status") in ("completed", "stopped")


def last_policy(entries: dict[str, dict], stages: list[dict]) -> tuple[str | None, str | None]:
    """``(policy, gated)``: the last training stage's model, or, when a gate stopped the run, the model before the
    gated stage (what the runner keeps) and that stage's name."""
    policy = None
    for stage in stages:
        entry = entries.get(stage_name(stage))
        if not finished(entry):
            return policy, stage_name(stage)
        if stage["type"] in TRAINING:
            policy = entry["outputs"]["final"]["path"]
    return policy, None


def kl_to_reference(policy: str, reference: str, prompts: list, *, samples: int, max_new_tokens: int,
                    seed: int) -> dict:
    """KL(policy || reference) per completion, estimated on completions sampled from the policy at temperature 1:
    the mean over samples of sum_t [log pi(y_t) - log pi_ref(y_t)] over the completion's tokens up to and including
    the first EOS. Also the mean number of those tokens."""
    import torch

    from trl_safeppo.monitoring.generation import _render, load_policy

    torch.manual_seed(seed)
    model, tok = load_policy(policy)
    ref, _ = load_policy(reference)
    model.eval()
    ref.eval()
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tok.padding_side = "left"
    kls, lengths = [], []
    for start in range(0, len(prompts), 25):
        texts = [_render(tok, p) for p in prompts[start : start + 25] for _ in range(samples)]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
            width = batch["input_ids"].shape[1]
            new = ids[:, width:]
            # completion mask: tokens up to and including the first EOS
            is_eos = (new == eos).int()
            mask = (torch.cumsum(is_eos, dim=1) - is_eos) == 0
            attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)
            logps = []
            for m in (model, ref):
                logits = m(input_ids=ids, attention_mask=attention).logits[:, width - 1 : -1].float()
                logps.append(torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1))
            kls += ((logps[0] - logps[1]) * mask).sum(1).tolist()
            lengths += mask.sum(1).tolist()
    return {"kl": sum(kls) / len(kls), "sampled_length": sum(lengths) / len(lengths), "n": len(kls)}


def score(policy: str, sft_model: str, tree: dict, args: argparse.Namespace, seed: int) -> dict:
    from trl_safeppo.monitoring.evaluation import evaluate_heldout
    from trl_safeppo.pipeline import data as data_mod

    ev = dict(tree["eval"])
    spec = ev.pop("dataset")
    path = spec["path"] if isinstance(spec, dict) else spec  # the whole split, as the final eval stage scores it
    full = data_mod.load(data_mod.normalize({"path": path}, where="eval.dataset", shared=tree.get("data")),
                         where="eval.dataset", seed=seed)
    result = evaluate_heldout(policy, full, tree.get("reward"), accuracy_reward=ev.get("accuracy_reward"),
                              format_reward=ev.get("format_reward"), max_new_tokens=ev.get("max_new_tokens", 64),
                              batch_size=ev.get("batch_size", 16))
    prompts = full.to_list()[: args.kl_prompts]
    kl = kl_to_reference(policy, sft_model, [r["prompt"] for r in prompts], samples=args.kl_samples,
                         max_new_tokens=ev.get("max_new_tokens", 64), seed=seed)
    return {"accuracy": result["accuracy"], "answer_accuracy": result.get("answer_accuracy"),
            "format_pass_rate": result.get("format_pass_rate"),
            "mean_length": result["mean_length"], "n": result["n"], "kl_to_sft": kl["kl"],
            "kl_sampled_length": kl["sampled_length"], "kl_n": kl["n"], "policy": policy}


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    overrides = [f"seed={seed}"]
    tree = resolved_tree(args.recipe, overrides)
    overrides += cap_steps(tree["stages"], args.steps)
    tree = resolved_tree(args.recipe, overrides)
    stages = tree["stages"]
    base = args.out / "stage_ablation" / f"seed{seed}"
    full_dir = Path(args.full_run_dir.format(seed=seed)) if args.full_run_dir else base / "full"
    print(f"seed {seed}: full chain in {full_dir}", flush=True)
    walls = {"full": run_cli(args.recipe, [*overrides, f"output_dir={full_dir}"], args.threads)}
    entries = finals(full_dir)
    sft_model = entries[stage_name(stages[0])]["outputs"]["final"]["path"]
    out: dict = {"full_run": str(full_dir), "sft_model": sft_model, "variants": {}}
    import yaml

    from trl_safeppo.fileio import write_text

    for variant in args.variants:
        prefix, rest = plan_variant(stages, VARIANTS[variant])
        if variant == "full":
            policy, gated = last_policy(entries, stages)
        elif not finished(entries.get(prefix)):
            print(f"seed {seed}: {variant} not run: the full chain stopped before {prefix}", flush=True)
            out["variants"][variant] = {"start": prefix, "stages": [], "not_run": f"full chain stopped before {prefix}"}
            continue
        elif not rest:
            policy, gated = entries[prefix]["outputs"]["final"]["path"], None
        else:
            vdir = base / variant.replace(" ", "_").lower()
            vtree = {**tree, "model": entries[prefix]["outputs"]["final"]["path"], "stages": rest,
                     "output_dir": str(vdir)}
            vdir.mkdir(parents=True, exist_ok=True)
            recipe = vdir / "recipe.yaml"
            write_text(recipe, yaml.safe_dump(vtree, sort_keys=False))
            print(f"seed {seed}: {variant} from {prefix}, stages {[stage_name(s) for s in rest]}", flush=True)
            walls[variant] = run_cli(str(recipe), [], args.threads)
            policy, gated = last_policy(finals(vdir), rest)
            policy = policy or entries[prefix]["outputs"]["final"]["path"]  # gated at its first stage
        out["variants"][variant] = {"start": prefix or "-", "stages": [stage_name(s) for s in rest],
                                    "gated": gated, **score(policy, sft_model, tree, args, seed)}
    out["sft"] = score(sft_model, sft_model, tree, args, seed)
    out["wall_seconds"] = walls
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
def table(results: dict[int, dict], variants: list[str]) -> list[tuple[str, ...]]:
    seeds = sorted(results)

    def cell(key: str, variant: str | None, fmt: str) -> str:
        runs = [results[s]["sft"] if variant is None else results[s]["variants"].get(variant, {}) for s in seeds]
        vals = [r.get(key) for r in runs]
        known = [v for v in vals if v is not None]
        if not known:
            return "not run"
        mean = sum(known) / len(known)
        each = " / ".join("-" if v is None else f"{v:{fmt}}" + (" (gated)" if r.get("gated") else "")
                          for v, r in zip(vals, runs))
        return f"{mean:{fmt}} ({each})"

    rows = [("SFT warm start", cell("accuracy", None, ".3f"), cell("answer_accuracy", None, ".3f"),
             cell("format_pass_rate", None, ".2f"), cell("mean_length", None, ".1f"), "0")]
    for v in variants:
        rows.append((v, cell("accuracy", v, ".3f"), cell("answer_accuracy", v, ".3f"),
                     cell("format_pass_rate", v, ".2f"), cell("mean_length", v, ".1f"), cell("kl_to_sft", v, ".2f")))
    return rows


# held-out accuracy: the recipe's (the demo's `strict`: right answer in the required format); answer accuracy: the
# answer-only rule beside it (`math`), "not run" where the recipe's accuracy is the answer-only one
HEADER = ("variant", "held-out accuracy", "answer accuracy", "format pass", "mean length (tokens)",
          "KL to SFT (nats / completion)")


def markdown(rows: list[tuple[str, ...]], seeds: list[int]) -> str:
    lines = [f"| {' | '.join(HEADER)} |", "|" + "---|" * len(HEADER)]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines) + f"\n\nMean over seeds {', '.join(map(str, seeds))} (per seed in brackets).\n"


def plot(results: dict[int, dict], variants: list[str], args: argparse.Namespace):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(results)
    names = ["SFT", *variants]
    panels = (("accuracy", "held-out accuracy"), ("format_pass_rate", "format pass"),
              ("mean_length", "mean length (tokens)"), ("kl_to_sft", "KL to SFT (nats / completion)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    colors = ["tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red"]
    for ax, (key, label) in zip(axes, panels):
        shown = []
        for i, name in enumerate(names):
            vals = [(results[s]["sft"] if name == "SFT" else results[s]["variants"].get(name, {})).get(key)
                    for s in seeds]
            vals = [0.0 if (key == "kl_to_sft" and name == "SFT") else v for v in vals if v is not None]
            if not vals:
                continue
            ax.bar(i, sum(vals) / len(vals), color=colors[i % len(colors)], alpha=0.75)
            ax.plot([i] * len(vals), vals, "k.", ms=6)
            shown += vals
        if key == "accuracy" and shown:  # the differences are a few points: zoom in
            ax.set_ylim(max(0.0, min(shown) - 0.1), min(1.0, max(shown) + 0.05))
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"stage ablation of {Path(args.recipe).name}: bars = mean over seeds {seeds}, dots = each seed",
                 fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {seed: run_seed(args, seed) for seed in args.seeds}
    rows = table(results, args.variants)
    print_table("stage ablation: final policy of each variant (mean over seeds; per seed in brackets)", rows, HEADER)
    md = markdown(rows, sorted(results))
    from trl_safeppo.fileio import write_text

    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "stage_ablation.md", md)
    save_figure(plot(results, args.variants, args), args.out, "stage_ablation")
    payload = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
               "total_wall_seconds": time.perf_counter() - t0, "seeds": results}
    write_json(args.out, "stage_ablation", payload)
    return payload


if __name__ == "__main__":
    main()
