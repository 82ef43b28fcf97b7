"""Verifier self-test (pre-flight): run a reward spec against a dataset before training.

``check_rewards(spec, rows)`` (and ``trl-safeppo check-rewards``) builds, for every row, a *gold* completion from a
template filled with the row's columns (default: the R1 format around the ``answer`` column) and a *control*
completion (the same template with every field replaced by ``__wrong__``), then checks that

- gold-vs-gold scores full marks (``gold_pass_rate`` over the rows that could be judged),
- the unparseable-gold rate (share of None from the rules that read a gold column) and the None rate of the total
  stay below their thresholds,
- the control does not pass (a rule that passes anything is caught),
- scores are identical when computed in the main thread, in a thread pool and in spawned worker processes
  (which also proves the reward pickles),

and reports the per-completion latency. ``report.ok`` is False (the CLI exits 1) past any threshold.

Each rule runs under the trainers' reward timeout (``timeout_s``, the stage's ``reward_timeout_s``; default 60 s):
a rule that does not return in time raises `RewardTimeoutError`, one line naming the rule and the timeout.
"""

from __future__ import annotations

import json
import math
import os
import string
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..fileio import write_json
from ..safe_yaml import safe_yaml_load  # size and alias expansion capped, as for `run`
from .base import Rule
from .checker import RuleChecker, RuleScores
from .spec import resolve
from .timeout import DEFAULT_TIMEOUT_S, TimedReward, check_timeout

DEFAULT_GOLD_TEMPLATE = "<think>\nThe answer is {answer}.\n</think>\n<answer>{answer}</answer>"
_RESERVED = ("prompt", "completion", "completion_ids")


@dataclass
class SelfTestReport:
    """Outcome of `check_rewards`. Rates are fractions in [0, 1]; latency in milliseconds per completion."""

    reward: str
    n: int
    gold_pass_rate: float
    gold_mean_total: float | None
    none_rate: float
    unparseable_gold_rate: float
    rule_none_rates: dict[str, float]
    control_pass_rate: float
    latency_ms_mean: float
    latency_ms_max: float
    deterministic_threads: bool | None
    deterministic_processes: bool | None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def format(self) -> str:
        def pct(x: float) -> str:
            return f"{100 * x:.1f}%"

        lines = [
            f"reward: {self.reward}  (n={self.n})",
            f"  gold-vs-gold pass rate : {pct(self.gold_pass_rate)}"
            + (f"  (mean total {self.gold_mean_total:.4g})" if self.gold_mean_total is not None else ""),
            f"  unparseable-gold rate  : {pct(self.unparseable_gold_rate)}",
            f"  None rate (total)      : {pct(self.none_rate)}",
            "  None rate per rule     : " + ", ".join(f"{k} {pct(v)}" for k, v in self.rule_none_rates.items()),
            f"  control pass rate      : {pct(self.control_pass_rate)}",
            f"  latency per completion : mean {self.latency_ms_mean:.3f} ms, worst batch {self.latency_ms_max:.3f} ms",
            f"  deterministic threads  : {_yes_no(self.deterministic_threads)}",
            f"  deterministic processes: {_yes_no(self.deterministic_processes)}",
        ]
        lines.append("OK" if self.ok else "FAILED:\n" + "\n".join(f"  - {f}" for f in self.failures))
        return "\n".join(lines)


def _yes_no(value: bool | None) -> str:
    return "skipped" if value is None else ("yes" if value else "NO")


class _Fields(dict):
    def __init__(self, row: Mapping, wrong: bool):
        super().__init__()
        self.row, self.wrong = row, wrong

    def __missing__(self, key: str) -> str:
        if key not in self.row:
            raise ValueError(f"gold template field {{{key}}} is not a dataset column; columns: {sorted(self.row)}")
        return "__wrong__" if self.wrong else str(self.row[key])


def render(template: str, row: Mapping, wrong: bool = False) -> str:
    """Fill ``template`` (``str.format`` fields) with the row's columns; ``wrong=True`` puts ``__wrong__`` instead."""
    return string.Formatter().vformat(template, (), _Fields(row, wrong))


def _columns(rows: Sequence[Mapping]) -> dict[str, list]:
    keys = [k for k in rows[0] if k not in _RESERVED]
    return {k: [r.get(k) for r in rows] for k in keys}


def _score(checker: RuleChecker, rows: Sequence[Mapping], completions: list) -> RuleScores:
    prompts = [r.get("prompt") for r in rows]
    return checker.score(prompts=prompts, completions=completions, **_columns(rows))


def _score_chunk(checker: RuleChecker, rows: list[dict], completions: list) -> tuple[list, dict]:
    """Worker entry point (module level so that spawned processes can import it)."""
    scores = _score(checker, rows, completions)
    return scores.total, scores.breakdown


def _timed(checker: RuleChecker, timeout_s: float | None) -> RuleChecker:
    """The checker with each rule behind its own deadline (a timeout raises, naming the rule); itself when None."""
    if timeout_s is None:
        return checker
    components = [replace(c, func=TimedReward(c.func, timeout_s, name=c.name, on_timeout="raise"))
                  for c in checker.components]
    return RuleChecker(components, checker.gates, name=checker.__name__, pass_threshold=checker.pass_threshold)


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    size = max(1, math.ceil(n / max(1, k)))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _merge(parts: list[tuple[list, dict]]) -> tuple[list, dict]:
    total, breakdown = [], {}
    for t, b in parts:
        total.extend(t)
        for k, v in b.items():
            breakdown.setdefault(k, []).extend(v)
    return total, breakdown


def _same(a: tuple[list, dict], b: tuple[list, dict]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_rewards(
    spec: Any,
    rows: Sequence[Mapping] | Any,
    *,
    gold_template: str = DEFAULT_GOLD_TEMPLATE,
    gold_column: str | None = None,
    batch_size: int = 16,
    threads: int = 4,
    processes: int = 2,
    min_gold_pass_rate: float = 1.0,
    max_unparseable_gold_rate: float = 0.05,
    max_none_rate: float = 0.05,
    max_control_pass_rate: float = 0.0,
    max_latency_ms: float | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> SelfTestReport:
    """Run the verifier self-test of a reward spec on ``rows`` (a list of dicts or a `datasets.Dataset`).

    Args:
        spec: anything `resolve` accepts.
        rows: dataset rows; columns are passed to the rules as keyword arguments, ``prompt`` as the prompts.
        gold_template: ``str.format`` template of the gold completion, filled with the row's columns.
        gold_column: use this column as the gold completion instead of the template (string or conversational).
        batch_size: completions per reward call (the latency is measured per call).
        threads, processes: workers of the determinism checks (0 skips a check).
        min_gold_pass_rate, max_unparseable_gold_rate, max_none_rate, max_control_pass_rate, max_latency_ms:
            thresholds; any breach is listed in ``report.failures``.
        timeout_s: seconds each rule may take on one batch (the stage's ``reward_timeout_s``); past it
            `RewardTimeoutError` names the rule and the timeout. None: no timeout.
    """
    checker = resolve(spec)
    timeout_s = check_timeout(timeout_s, "timeout_s")
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("check_rewards: the dataset is empty")
    if gold_column is not None and gold_column not in rows[0]:
        raise ValueError(f"check_rewards: gold_column {gold_column!r} is not a dataset column; "
                         f"columns: {sorted(rows[0])}")
    gold = [r[gold_column] if gold_column else render(gold_template, r) for r in rows]
    control = [render(gold_template, r, wrong=True) for r in rows]
    n = len(rows)

    # Main thread, timed per batch; every rule under the deadline of the trainers.
    timed = _timed(checker, timeout_s)
    parts, per_completion_ms = [], []
    try:
        for lo, hi in _chunks(n, math.ceil(n / max(1, batch_size))):
            start = time.perf_counter()
            s = _score(timed, rows[lo:hi], gold[lo:hi])
            per_completion_ms.append(1000 * (time.perf_counter() - start) / (hi - lo))
            parts.append((s.total, s.breakdown))
        control_scores = _score(timed, rows, control)
    finally:
        for c in timed.components:
            if isinstance(c.func, TimedReward):
                c.func.close()
    reference = _merge(parts)
    total, breakdown = reference

    deterministic_threads = deterministic_processes = None
    if threads > 0:
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(_score_chunk, checker, rows[lo:hi], gold[lo:hi]) for lo, hi in _chunks(n, threads)]
            deterministic_threads = _same(reference, _merge([f.result() for f in futures]))
    if processes > 0:
        import multiprocessing

        from ..dotted import install_listed_folders, listed_folders

        ctx = multiprocessing.get_context("spawn")  # the workers find the recipe's modules as this process does
        with ProcessPoolExecutor(processes, mp_context=ctx, initializer=install_listed_folders,
                                 initargs=(listed_folders(),)) as pool:
            futures = [pool.submit(_score_chunk, checker, rows[lo:hi], gold[lo:hi]) for lo, hi in _chunks(n, processes)]
            deterministic_processes = _same(reference, _merge([f.result() for f in futures]))

    judged = [t for t in total if t is not None]
    passed = [t >= checker.pass_threshold - 1e-9 for t in judged]
    gold_rules = [c.name for c in checker.components if isinstance(c.func, Rule) and c.func.columns]
    rule_none = {name: sum(v is None for v in values) / n for name, values in breakdown.items()}
    report = SelfTestReport(
        reward=repr(checker),
        n=n,
        gold_pass_rate=(sum(passed) / len(passed)) if passed else 0.0,
        gold_mean_total=(sum(judged) / len(judged)) if judged else None,
        none_rate=sum(t is None for t in total) / n,
        unparseable_gold_rate=max((rule_none[r] for r in gold_rules), default=0.0),
        rule_none_rates=rule_none,
        control_pass_rate=sum(control_scores.passed) / n,
        latency_ms_mean=sum(per_completion_ms) / len(per_completion_ms),
        latency_ms_max=max(per_completion_ms),
        deterministic_threads=deterministic_threads,
        deterministic_processes=deterministic_processes,
    )
    f = report.failures
    if not judged:
        f.append("no row could be judged (every total is None)")
    if report.gold_pass_rate < min_gold_pass_rate:
        f.append(f"gold-vs-gold pass rate {report.gold_pass_rate:.3f} < {min_gold_pass_rate} "
                 f"(a correct completion does not get full marks: check the gold template and the rule options)")
    if report.unparseable_gold_rate > max_unparseable_gold_rate:
        f.append(f"unparseable-gold rate {report.unparseable_gold_rate:.3f} > {max_unparseable_gold_rate}")
    if report.none_rate > max_none_rate:
        f.append(f"None rate {report.none_rate:.3f} > {max_none_rate}")
    if report.control_pass_rate > max_control_pass_rate:
        f.append(f"control pass rate {report.control_pass_rate:.3f} > {max_control_pass_rate} "
                 f"(completions with a wrong answer pass)")
    if max_latency_ms is not None and report.latency_ms_mean > max_latency_ms:
        f.append(f"latency {report.latency_ms_mean:.3f} ms per completion > {max_latency_ms} ms")
    if deterministic_threads is False:
        f.append("scores differ between the main thread and a thread pool")
    if deterministic_processes is False:
        f.append("scores differ between the main process and worker processes")
    return report


# --- CLI: trl-safeppo check-rewards -----------------------------------------------------------------------------


def load_reward_spec(value: str) -> Any:
    """A spec from the command line: a YAML/JSON file (its ``reward`` key if it is a recipe), inline YAML, or a name."""
    import yaml

    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            data = safe_yaml_load(f.read(), what=value)
        if isinstance(data, Mapping) and "reward" in data:
            _import_recipe_modules(value, data.get("imports") or [])
            return data["reward"]
        return data
    try:
        data = safe_yaml_load(value, what="--reward")
    except yaml.YAMLError as err:
        raise ValueError(f"--reward {value!r} is neither a file, a rule name nor valid YAML: {err}") from None
    return data


def _import_recipe_modules(recipe_path: str, modules: list) -> None:
    """A recipe's ``imports:`` (its custom rules), found as ``trl-safeppo run`` finds them: installed packages, then
    the recipe's folder, then the working directory."""
    from pathlib import Path

    from ..dotted import add_search_folders, check_module_name, import_listed

    folders = list(dict.fromkeys([Path(recipe_path).resolve().parent, Path.cwd().resolve()]))
    add_search_folders(folders, modules)
    for j, module in enumerate(modules):
        check_module_name(module, where=f"{recipe_path}: imports[{j}]")
        import_listed(module, modules, folders, where=f"{recipe_path}: imports[{j}]")


def load_rows(value: str, n: int | None, seed: int = 0) -> list[dict]:
    """``tiny-arithmetic`` (the embedded task's rl split) or a ``.jsonl`` / ``.json`` file of rows."""
    if value in ("tiny-arithmetic", "arithmetic"):
        from ..tasks.arithmetic import load_arithmetic

        return [dict(r) for r in load_arithmetic("rl", n=n, seed=seed)]
    if not os.path.isfile(value):
        raise FileNotFoundError(f"--dataset {value!r}: not a file; give 'tiny-arithmetic' or a .jsonl/.json path")
    with open(value, encoding="utf-8") as f:
        if value.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"--dataset {value!r}: expected JSON objects, one per row")
    return rows[:n] if n else rows


def _timeout_arg(value: str) -> float | None:
    if value.strip().lower() in ("none", "null"):
        return None
    try:
        return check_timeout(float(value), "--timeout-s")
    except ValueError as err:
        import argparse

        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser) -> None:
    parser.add_argument("--reward", required=True,
                        help="reward spec: a built-in name, a dotted path, inline YAML, or a YAML file (a recipe's "
                             "`reward` key is used)")
    parser.add_argument("--dataset", default="tiny-arithmetic", help="'tiny-arithmetic' or a .jsonl/.json file")
    parser.add_argument("-n", "--num-rows", type=int, default=64, help="rows to check (0: all)")
    parser.add_argument("--gold-template", default=DEFAULT_GOLD_TEMPLATE,
                        help="str.format template of the gold completion, filled with the row's columns")
    parser.add_argument("--gold-column", default=None, help="use this column as the gold completion instead")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4, help="thread-pool workers for the determinism check")
    parser.add_argument("--processes", type=int, default=2, help="worker processes for the determinism check")
    parser.add_argument("--min-gold-pass-rate", type=float, default=1.0)
    parser.add_argument("--max-unparseable-gold-rate", type=float, default=0.05)
    parser.add_argument("--max-none-rate", type=float, default=0.05)
    parser.add_argument("--max-control-pass-rate", type=float, default=0.0)
    parser.add_argument("--max-latency-ms", type=float, default=None, help="mean latency per completion")
    parser.add_argument("--timeout-s", type=_timeout_arg, default=DEFAULT_TIMEOUT_S,
                        help="seconds each rule may take on one batch (as the trainers' reward_timeout_s); "
                             "'none' for no timeout")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")


def run(args) -> int:
    spec = load_reward_spec(args.reward)
    rows = load_rows(args.dataset, args.num_rows or None)
    report = check_rewards(
        spec, rows, gold_template=args.gold_template, gold_column=args.gold_column, batch_size=args.batch_size,
        threads=args.threads, processes=args.processes, min_gold_pass_rate=args.min_gold_pass_rate,
        max_unparseable_gold_rate=args.max_unparseable_gold_rate, max_none_rate=args.max_none_rate,
        max_control_pass_rate=args.max_control_pass_rate, max_latency_ms=args.max_latency_ms,
        timeout_s=args.timeout_s,
    )
    print(report.format())
    if args.json_path:
        write_json(args.json_path, report.to_dict())
    return 0 if report.ok else 1
