"""Command-line front end: ``trl-safeppo <command> ...``.

Each subcommand lives in the module that implements it; that module provides ``add_arguments(parser)`` and
``run(args) -> int``. The table below is the whole registry: a plain dict, imported lazily so that
``trl-safeppo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny": ("trl_safeppo.tiny", "build, list or locate the embedded tiny:// models"),
    "run": ("trl_safeppo.pipeline.runner", "run a recipe: every stage of a YAML file, resumable (see docs/recipes.md)"),
    "report": ("trl_safeppo.monitoring.report", "rebuild report.md and plots/ of a finished or interrupted run"),
    "sample": ("trl_safeppo.rejection_sampling.cli", "rejection sampling: generate, score, keep what passes"),
    "check-rewards": ("trl_safeppo.rewards.selftest", "verifier self-test of a reward spec on a dataset (pre-flight)"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="trl-safeppo",
        description="PPO back on current TRL, with safety rails, rule-based rewards and one-YAML recipes.",
    )
    parser.add_argument("--version", action="version", version=f"trl-safeppo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # configuration errors: one clear line, no traceback
        print(f"trl-safeppo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
