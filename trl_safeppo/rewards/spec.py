"""Reward specs: ``resolve(spec)`` turns YAML-friendly data (or a Python callable) into one `RuleChecker`.

Accepted forms (see docs/rewards.md)::

    math                                              a built-in name
    my_pkg.my_rules:checker   /   my_pkg.my_rules.checker   a dotted path to a reward function
    {name: <python callable>, weight: 2.0}            (Python API) a reward function object with a weight
    {name: length, max: 400, weight: 0.5}             one rule with options (flat, or under `kwargs:`)
    [{name: format, weight: 0.5, gate: {below: 1.0, value: 0.0}}, {name: math}]      several rules
    {rules: [...], name: r1, pass_threshold: 1.0}     several rules plus checker options

Rule-entry keys: ``name`` (required), ``weight`` (default 1.0), ``alias`` (name in logs and breakdown; default the
rule's name), ``required`` (None from this rule makes the total None), ``gate`` (``{below, value=0.0, on=<this
rule>}``: when rule ``on`` scores below ``below``, the total is ``value``), ``kwargs`` (options); any other key is
an option of the rule.

A dotted path must name a callable marked for the job, checked before anything is called: ``@reward_function``
(used as is, takes no options) or ``@reward_factory`` (called with the rule's options, ``fn(**options)`` must return
the reward function). Anything else (``os.system``, an unmarked function) is refused. In a recipe its module must
also be listed under ``imports:`` (``resolve(spec, imports=[...])``); see :mod:`trl_safeppo.dotted`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from ..dotted import HOW_TO_REGISTER, DottedPathError, find, split
from .checker import Component, Gate, RuleChecker

# YAML name -> "module:factory". Factories take the rule's options as keyword arguments.
BUILTINS: dict[str, str] = {
    "math": "trl_safeppo.rewards.rules.math:math_reward",
    "gsm8k": "trl_safeppo.rewards.rules.math:gsm8k_reward",
    "format": "trl_safeppo.rewards.rules.format:format_reward",
    "exact": "trl_safeppo.rewards.rules.text:exact_reward",
    "regex": "trl_safeppo.rewards.rules.text:regex_reward",
    "choice": "trl_safeppo.rewards.rules.text:choice_reward",
    "length": "trl_safeppo.rewards.rules.text:length_reward",
    "language": "trl_safeppo.rewards.rules.text:language_reward",
    "json": "trl_safeppo.rewards.rules.structured:json_reward",
    "code_compiles": "trl_safeppo.rewards.rules.code:code_compiles_reward",
    "code_tests": "trl_safeppo.rewards.rules.code:code_tests_reward",
    "refusal": "trl_safeppo.rewards.rules.refusal:refusal_reward",
}

_ENTRY_KEYS = ("name", "weight", "alias", "required", "gate", "kwargs")
_CHECKER_KEYS = ("rules", "name", "pass_threshold")
_GATE_KEYS = ("on", "below", "value")


# The mark a dotted path needs (an attribute set by the decorators below; read with getattr_static, so an object with
# a permissive __getattr__ cannot fake it).
MARK = "__trl_safeppo_reward__"
_BUILTIN_TARGETS = {target: name for name, target in BUILTINS.items()}


def reward_function(func: Callable) -> Callable:
    """Mark ``func`` as a reward function a recipe may name by dotted path (used as is; it takes no options).

    ```python
    >>> @reward_function
    ... def short(prompts, completions, completion_ids=None, **kwargs):
    ...     return [1.0 if len(c) < 10 else 0.0 for c in completions]
    >>> short(None, ["ok", "far too long"])
    [1.0, 0.0]

    ```
    """
    setattr(func, MARK, "function")
    return func


def reward_factory(factory: Callable) -> Callable:
    """Mark ``factory`` as a builder of reward functions a recipe may name by dotted path: the rule's options are its
    keyword arguments (``{name: my_rules:max_words, limit: 40}`` calls ``max_words(limit=40)``), and it must return
    the reward function. A class (e.g. a :class:`trl_safeppo.rewards.Rule` subclass) can be marked too."""
    setattr(factory, MARK, "factory")
    return factory


def _mark(obj: Any) -> str | None:
    try:
        value = inspect.getattr_static(obj, MARK)
    except AttributeError:
        return None
    return value if value in ("function", "factory") else None


def _import_target(path: str, where: str, imports: Sequence[str] | None) -> tuple[Any, str]:
    """The marked callable a dotted path names and its mark, resolved without calling anything."""
    obj = find(path, where=where, what="reward", imports=imports, fix=HOW_TO_REGISTER)
    mark = _mark(obj)
    if mark is None:
        kind = "a callable" if callable(obj) else f"a {type(obj).__name__}"
        raise DottedPathError(where, f"reward {path!r} is {kind} without the reward mark, so it is not called",
                              HOW_TO_REGISTER)
    return obj, mark


def _builtin_factory(name: str) -> Callable:
    module, _, attr = BUILTINS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {type(value).__name__} {value!r}")
    return float(value)


def _entry(raw: Any, where: str, imports: Sequence[str] | None = None) -> tuple[Component, dict | None]:
    """One rule entry -> (Component, raw gate dict or None)."""
    if isinstance(raw, str):
        raw = {"name": raw}
    elif callable(raw):
        name = getattr(raw, "__name__", type(raw).__name__)
        return Component(name=name, func=raw), None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a rule must be a name, a dotted path or a mapping with `name`, got "
                         f"{type(raw).__name__} {raw!r:.60}")
    if "name" not in raw:
        raise ValueError(f"{where}: missing key `name` (a built-in rule {sorted(BUILTINS)} or a dotted path)")
    name = raw["name"]
    if callable(name):  # Python API: {"name": my_reward_function, "weight": 2.0}
        target, name = name, getattr(name, "__name__", type(name).__name__)
    elif not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected a rule name or dotted path, got {name!r}")
    else:
        target = None
    options = {k: v for k, v in raw.items() if k not in _ENTRY_KEYS}
    extra = raw.get("kwargs") or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"{where}.kwargs: expected a mapping of options, got {type(extra).__name__}")
    both = sorted(set(options) & set(extra))
    if both:
        raise ValueError(f"{where}: option(s) {both} given both flat and under `kwargs`; give each once")
    options.update(extra)

    if isinstance(name, str) and ":".join(split(name)) in _BUILTIN_TARGETS:
        name = _BUILTIN_TARGETS[":".join(split(name))]  # a built-in's own dotted path is the built-in
    if target is not None:
        func = target(**options) if options else target
    elif name in BUILTINS:
        factory = _builtin_factory(name)
        accepted = inspect.signature(factory).parameters
        unknown = sorted(k for k in options if k not in accepted)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown} for rule {name!r}; it accepts "
                             f"{sorted(accepted)} plus the entry keys {list(_ENTRY_KEYS)}")
        try:
            func = factory(**options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from err
    elif "." in name or ":" in name:
        target, mark = _import_target(name, f"{where}.name", imports)
        if mark == "factory":
            try:
                func = target(**options)
            except Exception as err:
                raise ValueError(f"{where}: factory {name!r} failed with options {options}: "
                                 f"{type(err).__name__}: {err}") from err
            if not callable(func):
                raise ValueError(f"{where}: factory {name!r} returned {type(func).__name__}, not a reward function")
        elif options:
            raise ValueError(f"{where}: {name!r} is a @reward_function, which takes no options (got "
                             f"{sorted(options)}); mark a function that builds the rule with @reward_factory instead")
        else:
            func = target
    else:
        raise ValueError(f"{where}.name: unknown rule {name!r}; built-in rules are {sorted(BUILTINS)}, or give a "
                         f"dotted path like 'my_pkg.my_rules:my_reward'")

    alias = raw.get("alias")
    if alias is not None and (not isinstance(alias, str) or not alias):
        raise ValueError(f"{where}.alias: expected a non-empty string, got {alias!r}")
    rule_name = alias or getattr(func, "__name__", None) or name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    weight = _number(raw.get("weight", 1.0), f"{where}.weight")
    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise ValueError(f"{where}.required: expected true or false, got {required!r}")
    gate = raw.get("gate")
    if gate is not None and not isinstance(gate, Mapping):
        raise ValueError(f"{where}.gate: expected a mapping like {{below: 1.0, value: 0.0}}, got {gate!r}")
    return Component(name=str(rule_name), func=func, weight=weight, required=required), gate


def _gate(raw: Mapping, owner: str, where: str) -> Gate:
    unknown = sorted(k for k in raw if k not in _GATE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a gate has {list(_GATE_KEYS)}")
    if "below" not in raw:
        raise ValueError(f"{where}: missing key `below` (the total is fixed when the rule scores below it)")
    on = raw.get("on", owner)
    if not isinstance(on, str):
        raise ValueError(f"{where}.on: expected a rule name, got {on!r}")
    return Gate(on=on, below=_number(raw["below"], f"{where}.below"), value=_number(raw.get("value", 0.0),
                                                                                    f"{where}.value"))


def resolve(spec: Any, path: str = "reward", *, imports: Sequence[str] | None = None) -> RuleChecker:
    """Turn a reward spec into one TRL-compatible reward function (a picklable `RuleChecker`).

    ``spec`` is a built-in name, a dotted path, a rule mapping, a list of those, a ``{rules: [...]}`` mapping, a
    Python callable, or an existing `RuleChecker` (returned unchanged). ``path`` prefixes error messages (the key
    path in the recipe). ``imports`` is a recipe's ``imports:`` list: a dotted path's module must be in it (``None``,
    the Python API: imported on demand); either way it must name a marked reward (:func:`reward_function`,
    :func:`reward_factory`) outside the standard library. A single rule keeps its own name (TRL logs ``rewards/math/mean``); a list is named
    ``rules`` unless the mapping form gives ``name``.

    Example:
    ```python
    >>> checker = resolve([{"name": "format", "weight": 0.5}, {"name": "math"}])
    >>> checker(completions=["<think>3+4</think><answer>7</answer>", "<answer>8</answer>"], answer=["7", "7"])
    [1.5, 0.125]

    ```
    The second completion: format 0.5 * 2 / 4 = 0.25 (two of four tags), weighted 0.5 -> 0.125; math 0.
    """
    if isinstance(spec, RuleChecker):
        return spec
    options: Mapping = {}
    if isinstance(spec, Mapping) and "rules" in spec:
        unknown = sorted(k for k in spec if k not in _CHECKER_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; a checker mapping has {list(_CHECKER_KEYS)}")
        options, spec, entries_path = spec, spec["rules"], f"{path}.rules"
        if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence):
            raise ValueError(f"{entries_path}: expected a list of rules, got {type(spec).__name__}")
        single = False
    elif isinstance(spec, (str, Mapping)) or callable(spec):
        spec, entries_path, single = [spec], path, True
    elif isinstance(spec, Sequence):
        entries_path, single = path, False
    else:
        raise ValueError(f"{path}: expected a rule name, dotted path, mapping or list, got {type(spec).__name__} "
                         f"{spec!r:.60}")
    if len(spec) == 0:
        raise ValueError(f"{entries_path}: the list of rules is empty")

    components, gates = [], []
    for i, raw in enumerate(spec):
        where = entries_path if single else f"{entries_path}[{i}]"
        component, gate = _entry(raw, where, imports)
        components.append(component)
        if gate is not None:
            gates.append((gate, component.name, f"{where}.gate"))
    names = [c.name for c in components]
    for i, c in enumerate(components):
        if c.name in names[:i]:
            raise ValueError(f"{entries_path}[{i}]: rule name {c.name!r} appears more than once; give each an "
                             f"`alias` (e.g. alias: {c.name}_2)")
    built_gates = []
    for raw_gate, owner, where in gates:
        gate = _gate(raw_gate, owner, where)
        if gate.on not in names:
            raise ValueError(f"{where}.on: no rule named {gate.on!r} in this checker; rules: {names}")
        built_gates.append(gate)

    name = options.get("name", components[0].name if single else "rules")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}.name: expected a non-empty string, got {name!r}")
    threshold = options.get("pass_threshold")
    if threshold is not None:
        threshold = _number(threshold, f"{path}.pass_threshold")
    return RuleChecker(components, built_gates, name=name, pass_threshold=threshold)


def validate_spec(spec: Any, path: str = "reward", *, imports: Sequence[str] | None = None) -> None:
    """Check a reward spec without running it; raise ``ValueError`` naming the key path (e.g. ``reward[1].gate``).

    Builds the rules (cheap: no model, no data), so unknown names, bad options and unimportable dotted paths are all
    reported at configuration time.
    """
    resolve(spec, path=path, imports=imports)
