"""``trl-safeppo sample ...``: the command line of a rejection-sampling run (one flag per config field)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..safe_yaml import safe_yaml_load  # size and alias expansion capped, as for a recipe
from .config import RejectionSamplingConfig
from .run import run_rejection_sampling


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of RejectionSamplingConfig fields (command-line flags override)")
    for f in dataclasses.fields(RejectionSamplingConfig):
        flag, kind = "--" + f.name.replace("_", "-"), f.type.split(" ")[0]  # "int | None" -> "int"
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if kind == "bool":
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "pass_rate_band":
            kwargs.update(nargs=2, type=float, metavar=("LOW", "HIGH"))
        elif f.name == "decontaminate":
            kwargs.update(nargs="+")
        else:
            kwargs.update(type={"int": int, "float": float}.get(kind, str))
        parser.add_argument(flag, **kwargs)


def _yaml(text: str, what: str) -> Any:
    import yaml

    try:
        return safe_yaml_load(text, what=what)
    except yaml.YAMLError as err:
        raise ValueError(f"{what} is not valid YAML/JSON: {err}") from None


def config_from_args(args: argparse.Namespace) -> RejectionSamplingConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = _yaml(Path(args.config).read_text(), f"--config={args.config!r}") or {}
        names = {f.name for f in dataclasses.fields(RejectionSamplingConfig)}
        if not isinstance(values, dict):
            raise ValueError(f"--config={args.config!r} must hold a mapping of RejectionSamplingConfig fields")
        if sorted(set(values) - names):
            raise ValueError(f"--config={args.config!r}: unknown fields {sorted(set(values) - names)}; known: "
                             f"{', '.join(sorted(names))}")
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(RejectionSamplingConfig)
                   if getattr(args, f.name, None) is not None})
    reward = values.get("reward")
    if isinstance(reward, str) and reward.strip().startswith(("[", "{")):  # --reward '[{name: format}, math]'
        values["reward"] = _yaml(reward, f"--reward={reward!r}")
    return RejectionSamplingConfig(**values)


def run(args: argparse.Namespace) -> int:
    print(run_rejection_sampling(config_from_args(args), distributed=True))  # distributed: also right for one process
    return 0
