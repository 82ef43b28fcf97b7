"""String rules: ``exact`` (normalized match), ``regex``, ``choice`` (multiple-choice letter), ``length`` and
``language`` (R1 language consistency)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from ..base import Rule, RewardRuleError, answer_region, check_extract

# --- exact -------------------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")


def normalize_text(text: str, mode: str = "basic") -> str:
    """``"none"``: unchanged. ``"strip"``: outer whitespace removed. ``"basic"``: NFKC, casefolded, whitespace
    collapsed, surrounding quotes / ``$`` / trailing period removed, ``\\boxed{x}`` unwrapped."""
    if mode == "none":
        return text
    if mode == "strip":
        return text.strip()
    text = unicodedata.normalize("NFKC", text).strip()
    m = re.fullmatch(r"\\boxed\{(.*)\}", text, re.DOTALL)
    if m:
        text = m.group(1)
    text = _WS.sub(" ", text).casefold().strip()
    text = text.strip("\"'`$ ").rstrip(".").strip()
    return text


_NORMALIZE_MODES = ("none", "strip", "basic")


class ExactRule(Rule):
    def __init__(self, column: str = "answer", normalize: str = "basic", extract: str = "answer"):
        if normalize not in _NORMALIZE_MODES:
            raise ValueError(f"reward rule 'exact': normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
        self.__name__ = "exact"
        self.column = column
        self.columns = (column,)
        self.normalize = normalize
        self.extract = check_extract("exact", extract)

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        gold = row[self.column]
        golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
        golds = [str(g) for g in golds if g is not None and not isinstance(g, bool)]
        golds = [normalize_text(g, self.normalize) for g in golds]
        golds = [g for g in golds if g != ""]
        if not golds:
            return None
        answer = normalize_text(answer_region(text, self.extract), self.normalize)
        return float(answer in golds)


def exact_reward(column: str = "answer", normalize: str = "basic", extract: str = "answer") -> ExactRule:
    """Exact match after normalization: 1.0 if the completion's answer equals the gold (or one of a list of golds).

    Normalization ``"basic"`` (default) casefolds, collapses whitespace, strips quotes, ``$``, a trailing period and
    a ``\\boxed{}`` wrapper; ``"strip"`` only trims; ``"none"`` compares raw strings. An empty gold gives ``None``.

    Example:
    ```python
    >>> exact_reward()(completions=["<think>..</think><answer> Paris. </answer>", "<answer>Lyon</answer>"],
    ...                answer=["paris", "Paris"])
    [1.0, 0.0]

    ```
    """
    return ExactRule(column=column, normalize=normalize, extract=extract)


# --- regex -------------------------------------------------------------------------------------------------------


class RegexRule(Rule):
    def __init__(
        self, pattern: str | None = None, column: str | None = None, fullmatch: bool = False, extract: str = "full",
        ignore_case: bool = False,
    ):
        if (pattern is None) == (column is None):
            raise ValueError("reward rule 'regex': give exactly one of `pattern` (fixed) or `column` (per-row pattern)")
        self.__name__ = "regex"
        self.flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
        if pattern is not None:
            try:
                re.compile(pattern, self.flags)
            except re.error as err:
                raise ValueError(f"reward rule 'regex': pattern {pattern!r} does not compile: {err}") from None
        self.pattern = pattern
        self.column = column
        self.columns = (column,) if column else ()
        self.fullmatch = bool(fullmatch)
        self.extract = check_extract("regex", extract)

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        pattern = self.pattern if self.column is None else row[self.column]
        if not isinstance(pattern, str) or not pattern:
            return None
        try:
            compiled = re.compile(pattern, self.flags)
        except re.error:
            return None
        region = answer_region(text, self.extract)
        match = compiled.fullmatch(region.strip()) if self.fullmatch else compiled.search(region)
        return float(match is not None)


def regex_reward(
    pattern: str | None = None, column: str | None = None, fullmatch: bool = False, extract: str = "full",
    ignore_case: bool = False,
) -> RegexRule:
    """Regular-expression match: 1.0 if ``pattern`` is found in the completion (``fullmatch=True``: matches the whole
    stripped text), else 0.0. The pattern is fixed (``pattern``) or read per row from a dataset ``column`` (an
    invalid or empty per-row pattern gives ``None``). Searches the whole completion unless ``extract="answer"``.

    Example:
    ```python
    >>> regex_reward(pattern=r"\\bQED\\b")(completions=["... hence QED", "no proof"])
    [1.0, 0.0]

    ```
    """
    return RegexRule(pattern=pattern, column=column, fullmatch=fullmatch, extract=extract, ignore_case=ignore_case)


# --- choice ------------------------------------------------------------------------------------------------------


class ChoiceRule(Rule):
    def __init__(self, column: str = "answer", letters: str = "ABCDEFGHIJ", extract: str = "answer"):
        if not letters or not letters.isalpha() or len(set(letters.upper())) != len(letters):
            raise ValueError(f"reward rule 'choice': letters must be distinct letters, got {letters!r}")
        self.__name__ = "choice"
        self.column = column
        self.columns = (column,)
        self.letters = letters.upper()
        self.extract = check_extract("choice", extract)
        cls = f"[{self.letters}]"
        # Most explicit first: \boxed{B}, "answer is (B)" / "Answer: B", then a short answer that is just the letter.
        self._explicit = [
            re.compile(rf"\\boxed\{{\s*\(?({cls})\)?\s*\}}"),
            re.compile(rf"answer\s*(?:is|:)?\s*[:\-]?\s*\(?\**({cls})\**\)?(?![A-Za-z])", re.IGNORECASE),
        ]
        self._alone = re.compile(rf"^\s*\(?\**({cls})\**\)?[\.\):]?\s*(?:$|\s)", re.IGNORECASE)

    def gold_letter(self, gold: Any) -> str | None:
        if isinstance(gold, bool) or gold is None:
            return None
        if isinstance(gold, int):
            return self.letters[gold] if 0 <= gold < len(self.letters) else None
        if isinstance(gold, str):
            m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\.?\s*", gold)
            if m and m.group(1).upper() in self.letters:
                return m.group(1).upper()
        return None

    def extract_letter(self, text: str) -> str | None:
        region = answer_region(text, self.extract)
        for pattern in self._explicit:
            found = pattern.findall(region)
            if found:
                return found[-1].upper()
        m = self._alone.match(region)
        return m.group(1).upper() if m else None

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        gold = self.gold_letter(row[self.column])
        if gold is None:
            return None
        return float(self.extract_letter(text) == gold)


def choice_reward(column: str = "answer", letters: str = "ABCDEFGHIJ", extract: str = "answer") -> ChoiceRule:
    """Multiple-choice letter: 1.0 if the chosen letter equals the gold, else 0.0.

    The letter is read, in this order, from ``\\boxed{B}``, ``answer is (B)`` / ``Answer: B`` (the last such phrase),
    or an answer that starts with the letter alone (``B``, ``(B)``, ``B.``, ``B) because ...``). The gold may be a
    letter or a 0-based index. A gold outside ``letters`` gives ``None``.

    Example:
    ```python
    >>> choice_reward()(completions=["<answer>(B)</answer>", "The answer is C.", "A"], answer=["B", "b", 0])
    [1.0, 0.0, 1.0]

    ```
    """
    return ChoiceRule(column=column, letters=letters, extract=extract)


# --- length ------------------------------------------------------------------------------------------------------


class LengthRule(Rule):
    def __init__(self, min: int | None = None, max: int | None = None, unit: str = "chars"):  # noqa: A002
        if unit not in ("chars", "tokens"):
            raise ValueError(f"reward rule 'length': unit must be 'chars' or 'tokens', got {unit!r}")
        if min is None and max is None:
            raise ValueError("reward rule 'length': give `min`, `max` or both")
        if min is not None and max is not None and int(min) > int(max):
            raise ValueError(f"reward rule 'length': min ({min}) is larger than max ({max})")
        self.__name__ = "length"
        self.min = None if min is None else int(min)
        self.max = None if max is None else int(max)
        self.unit = unit

    def score(self, text: str, row: dict[str, Any]) -> float:
        if self.unit == "tokens":
            ids = row["completion_ids"]
            if ids is None:
                raise RewardRuleError(
                    "reward rule 'length' with unit='tokens' needs `completion_ids` (TRL trainers pass them); "
                    "pass completion_ids=... or use unit='chars'"
                )
            n = len(ids)
        else:
            n = len(text)
        ok = (self.min is None or n >= self.min) and (self.max is None or n <= self.max)
        return float(ok)


def length_reward(min: int | None = None, max: int | None = None, unit: str = "chars") -> LengthRule:  # noqa: A002
    """Length bounds: 1.0 if ``min <= length <= max`` (either bound optional), else 0.0. ``unit="chars"`` counts
    characters of the completion text; ``unit="tokens"`` counts ``completion_ids``.

    Example:
    ```python
    >>> length_reward(min=2, max=4)(completions=["a", "abc", "abcde"])
    [0.0, 1.0, 0.0]

    ```
    """
    return LengthRule(min=min, max=max, unit=unit)


# --- language ----------------------------------------------------------------------------------------------------

# Language code -> Unicode script names (the first word of unicodedata.name) that count as that language.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "latin": ("LATIN",), "en": ("LATIN",), "fr": ("LATIN",), "de": ("LATIN",), "es": ("LATIN",), "it": ("LATIN",),
    "pt": ("LATIN",), "nl": ("LATIN",), "vi": ("LATIN",), "tr": ("LATIN",), "pl": ("LATIN",), "id": ("LATIN",),
    "zh": ("CJK",), "han": ("CJK",), "ja": ("CJK", "HIRAGANA", "KATAKANA"), "ko": ("HANGUL",),
    "ru": ("CYRILLIC",), "uk": ("CYRILLIC",), "cyrillic": ("CYRILLIC",), "el": ("GREEK",), "ar": ("ARABIC",),
    "fa": ("ARABIC",), "he": ("HEBREW",), "hi": ("DEVANAGARI",), "th": ("THAI",), "bn": ("BENGALI",),
}


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else ""


class LanguageRule(Rule):
    def __init__(self, target: str = "en", scope: str = "think", column: str | None = None,
                 no_letters: float | None = None):
        if column is None and target.lower() not in SCRIPTS:
            raise ValueError(f"reward rule 'language': unknown target {target!r}; known: {sorted(SCRIPTS)}")
        if scope not in ("think", "answer", "full"):
            raise ValueError(f"reward rule 'language': scope must be 'think', 'answer' or 'full', got {scope!r}")
        self.__name__ = "language"
        self.target = target.lower()
        self.scope = scope
        self.column = column
        self.columns = (column,) if column else ()
        self.no_letters = None if no_letters is None else float(no_letters)

    def region(self, text: str) -> str:
        if self.scope == "full":
            return text
        if self.scope == "answer":
            return answer_region(text)
        if "</think>" in text:
            before = text.split("</think>", 1)[0]
            return before.split("<think>", 1)[-1]
        return text.split("<answer>", 1)[0].replace("<think>", "")

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        target = self.target if self.column is None else str(row[self.column] or "").lower()
        scripts = SCRIPTS.get(target)
        if scripts is None:
            return None
        letters = [ch for ch in self.region(text) if ch.isalpha()]
        if not letters:
            return self.no_letters
        return sum(_script(ch) in scripts for ch in letters) / len(letters)


def language_reward(
    target: str = "en", scope: str = "think", column: str | None = None, no_letters: float | None = None
) -> LanguageRule:
    """Language consistency (DeepSeek-R1 §2.3.3): the share of letters in the reasoning written in the target
    language's script, in [0, 1]. ``scope`` is ``"think"`` (the reasoning, default), ``"answer"`` or ``"full"``.
    The target is fixed (``target``, a language code or script name) or read per row from ``column``. A region with
    no letters (e.g. only digits) scores ``no_letters`` (default ``None``: cannot judge). Script-level: it tells
    English from Chinese, not English from French.

    Example:
    ```python
    >>> rule = language_reward(target="en")
    >>> rule(completions=["<think>add them 加</think><answer>7</answer>", "<think>1+2</think>"])
    [0.875, None]

    ```
    ``add them 加``: 7 Latin letters of 8.
    """
    return LanguageRule(target=target, scope=scope, column=column, no_letters=no_letters)
