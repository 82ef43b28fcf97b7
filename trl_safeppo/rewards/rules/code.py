"""Python code: ``code_compiles`` (parse/compile only, nothing runs) and ``code_tests`` (the completion's code and
the row's tests run in the sandbox of `trl_safeppo.rewards.sandbox`)."""

from __future__ import annotations

import re
import warnings
from typing import Any

from ..base import Rule, answer_region, check_extract
from ..sandbox import SandboxLimits, run_python, sandbox_available, sandbox_unavailable_reason, warn_unavailable

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str, extract: str = "answer") -> str:
    """The last fenced code block (```python ... ```) of the answer region, else the whole region."""
    region = answer_region(text, extract)
    blocks = _FENCE.findall(region)
    if not blocks and extract == "answer":
        blocks = _FENCE.findall(text)
    return (blocks[-1] if blocks else region).strip("\n")


def compiles(code: str) -> bool:
    """True if ``code`` is non-blank Python that compiles. Nothing is executed."""
    if not code.strip():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(code, "<completion>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
        return False
    return True


class CodeCompilesRule(Rule):
    def __init__(self, extract: str = "answer", max_chars: int = 100_000):
        self.__name__ = "code_compiles"
        self.extract = check_extract("code_compiles", extract)
        self.max_chars = int(max_chars)

    def score(self, text: str, row: dict[str, Any]) -> float:
        code = extract_code(text, self.extract)
        return float(len(code) <= self.max_chars and compiles(code))


def code_compiles_reward(extract: str = "answer", max_chars: int = 100_000) -> CodeCompilesRule:
    """1.0 if the completion's code (last ```python block of the answer, else the answer itself) compiles, else 0.0.
    Nothing is executed. Code longer than ``max_chars`` scores 0.

    Example:
    ```python
    >>> code_compiles_reward()(completions=["```python\\ndef f(x):\\n    return x\\n```", "def f(x) return x"])
    [1.0, 0.0]

    ```
    """
    return CodeCompilesRule(extract=extract, max_chars=max_chars)


class CodeTestsRule(Rule):
    def __init__(
        self,
        column: str = "tests",
        extract: str = "answer",
        timeout: float = 5.0,
        cpu_seconds: int = 5,
        memory_mb: int = 512,
        max_processes: int = 16,
        max_output_bytes: int = 1 << 20,
        workers: int = 1,
    ):
        if int(workers) < 1:
            raise ValueError(f"reward rule 'code_tests': workers must be >= 1, got {workers}")
        self.__name__ = "code_tests"
        self.column = column
        self.columns = (column,)
        self.extract = check_extract("code_tests", extract)
        self.limits = SandboxLimits(timeout=float(timeout), cpu_seconds=int(cpu_seconds), memory_mb=int(memory_mb),
                                    max_processes=int(max_processes), max_output_bytes=int(max_output_bytes))
        self.workers = int(workers)
        if not sandbox_available():  # probed once per process; say so now rather than at the first score
            warn_unavailable(sandbox_unavailable_reason())

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        tests = row[self.column]
        if isinstance(tests, (list, tuple)):
            tests = "\n".join(str(t) for t in tests)
        if not isinstance(tests, str) or not tests.strip() or not compiles(tests):
            return None  # no usable tests: cannot judge
        code = extract_code(text, self.extract)
        if not compiles(code):
            return 0.0  # no need to start a process
        result = run_python(code, tests, self.limits)
        if result.isolation == "unavailable":  # fail closed: never run unsandboxed, never score what did not run
            warn_unavailable(result.stderr)
            return None
        return float(result.passed)


def code_tests_reward(
    column: str = "tests",
    extract: str = "answer",
    timeout: float = 5.0,
    cpu_seconds: int = 5,
    memory_mb: int = 512,
    max_processes: int = 16,
    max_output_bytes: int = 1 << 20,
    workers: int = 1,
) -> CodeTestsRule:
    """1.0 if the completion's code followed by the row's tests (Python source from ``column``, e.g. ``assert``
    statements; a list is joined by newlines) runs to the end in the sandbox, else 0.0. Missing, blank or
    non-compiling tests give ``None``. Each completion runs in a fresh subprocess with a wall-clock ``timeout``,
    ``cpu_seconds``, ``memory_mb``, ``max_processes`` and ``max_output_bytes`` limits, no network and a throwaway
    working directory; exiting early (``sys.exit``, ``os._exit``) does not pass. See `trl_safeppo.rewards.sandbox`.
    Where the kernel cannot build the sandbox (no namespaces or seccomp), every score is ``None`` and one warning
    says why; nothing runs unsandboxed.
    ``workers`` sandboxes run at once (threads waiting on subprocesses; scores keep the completions' order).

    Example:
    ```python
    >>> rule = code_tests_reward(timeout=5)
    >>> rule(completions=["```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b):\\n    return a - b"],
    ...      tests=["assert add(2, 3) == 5", "assert add(2, 3) == 5"])
    [1.0, 0.0]

    ```
    """
    return CodeTestsRule(column, extract, timeout, cpu_seconds, memory_mb, max_processes, max_output_bytes, workers)
