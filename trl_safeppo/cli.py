"""Command-line front end: ``trl-safeppo <command> ...``.

Each subcommand lives in the module that implements it; that module provides ``add_arguments(parser)`` and
``run(args) -> int``. The table below is the whole registry: a plain dict, imported lazily so that
``trl-safeppo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
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


# True when this process's `main` switched the Hub to offline because the user had not set HF_HUB_OFFLINE
HUB_OFFLINE_DEFAULTED = False


def hub_mode_line() -> str:
    """One line saying whether models and datasets may come from the Hugging Face Hub in this process, and why."""
    from huggingface_hub.constants import is_offline_mode

    if not is_offline_mode():
        return "Hugging Face Hub: online (HF_HUB_OFFLINE is not 1): Hub models and datasets are downloaded as needed"
    why = ("trl-safeppo's default; export HF_HUB_OFFLINE=0 to download" if HUB_OFFLINE_DEFAULTED
           else "HF_HUB_OFFLINE=1 is set")
    return f"Hugging Face Hub: offline ({why}): models come from tiny://, local directories and the local cache"


def main(argv: list[str] | None = None) -> int:
    global HUB_OFFLINE_DEFAULTED
    # Offline unless the user says otherwise (as the Makefile does): a run never waits on network retries by surprise.
    # Set before anything imports huggingface_hub, which reads it once.
    if "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = "1"
        HUB_OFFLINE_DEFAULTED = True
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `run own.yaml --check output_dir=x`: argparse ends the positional list at the first option, so overrides
    # written after an option arrive here; they are overrides all the same (anything else is still an error)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
