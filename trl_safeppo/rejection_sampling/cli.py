"""``trl-safeppo sample ...``: the command line of a rejection-sampling run."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..safe_yaml import safe_yaml_load  # size and alias expansion capped, as for a recipe
from .config import RejectionSamplingConfig
from .run import run_rejection_sampling

# ---------------------------------------------------------------------------------------------------------------
# CLI: trl-safeppo sample
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of RejectionSamplingConfig fields (command-line flags override)")
    for f in dataclasses.fields(RejectionSamplingConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool",) or isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "pass_rate_band":
            parser.add_argument(flag, dest=f.name, nargs=2, type=float, metavar=("LOW", "HIGH"), help=help_text)
        elif f.name == "decontaminate":
            parser.add_argument(flag, dest=f.name, nargs="+", help=help_text)
        else:
            kind = {int: int, float: float}.get(type(f.default), str)
            if f.name in ("num_prompts", "max_per_prompt"):
                kind = int
            elif f.name in ("score_threshold",):
                kind = float
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> RejectionSamplingConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        loaded = safe_yaml_load(Path(args.config).read_text(), what=f"--config={args.config!r}") or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config={args.config!r} must hold a mapping of RejectionSamplingConfig fields")
        names = {f.name for f in dataclasses.fields(RejectionSamplingConfig)}
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ValueError(f"--config={args.config!r}: unknown fields {unknown}; known: {', '.join(sorted(names))}")
        values.update(loaded)
    for f in dataclasses.fields(RejectionSamplingConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    reward = values.get("reward")
    if isinstance(reward, str) and reward.strip().startswith(("[", "{")):  # --reward '[{name: format}, math]'
        import yaml

        try:
            values["reward"] = safe_yaml_load(reward, what="--reward")
        except yaml.YAMLError as err:
            raise ValueError(f"--reward={reward!r} is not valid YAML/JSON: {err}") from None
    return RejectionSamplingConfig(**values)


def run(args: argparse.Namespace) -> int:
    summary = run_rejection_sampling(config_from_args(args), distributed=True)  # also right for one process
    print(summary)
    return 0
