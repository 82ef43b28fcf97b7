"""Overhead of the reward timeout: a rule checker called directly vs through `TimedReward` (worker process + pipe).

100 calls on 64 completions of the embedded arithmetic task (gold completions, so every rule does its full work),
for a cheap rule (`format`) and the R1 pair (`format` + `math`). The three variants are interleaved, repeated,
and the best repeat of each is kept (the machine is shared). Prints milliseconds per 100 calls and the ratio to
the direct call. Run: ``python -m benchmarks.reward_timeout_overhead [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import time

from trl_safeppo.rewards import resolve
from trl_safeppo.rewards.timeout import TimedReward
from trl_safeppo.tasks.arithmetic import load_arithmetic

SPECS = {"format": ["format"], "format+math": [{"name": "format", "weight": 0.5}, {"name": "math"}]}


def _batch(n: int):
    rows = [dict(r) for r in load_arithmetic("rl", n=n, seed=0)]
    completions = [f"<think>\nThe answer is {r['answer']}.\n</think>\n<answer>{r['answer']}</answer>" for r in rows]
    return completions, [r["answer"] for r in rows]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--completions", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    completions, answers = _batch(args.completions)
    metrics = []
    results = {}
    for label, spec in SPECS.items():
        checker = resolve(spec)
        variants = {"direct": checker, "timeout=None": TimedReward(checker, None), "timeout=60": TimedReward(checker, 60)}
        for f in variants.values():  # warm-up: caches, and the worker's start
            f(completions=completions, answer=answers, log_metric=lambda k, v: metrics.append(v))
        best = {name: float("inf") for name in variants}
        for _ in range(args.repeats):
            for name, f in variants.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    f(completions=completions, answer=answers, log_metric=lambda k, v: metrics.append(v))
                best[name] = min(best[name], time.perf_counter() - start)
        results[label] = {name: 1000 * t for name, t in best.items()}
        for name, ms in results[label].items():
            print(f"{label:12} {name:13} {ms:8.1f} ms / {args.calls} calls   x{ms / results[label]['direct']:.2f}")
        variants["timeout=60"].close()
    return results


if __name__ == "__main__":
    main()
