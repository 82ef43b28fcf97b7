"""Datasets of a recipe stage: the accepted forms, loading, column renames and column checks.

Accepted forms of a stage's ``dataset`` (and of each entry of the recipe's shared ``data``):

- a key of the recipe's ``data`` mapping (``dataset: rl``);
- ``task://<task>/<split>``: the embedded task (``task://arithmetic/sft``, ``.../rl``, ``.../eval``);
- ``previous``: the most recent data of the needed kind produced by an earlier stage (for an SFT stage, the SFT set
  of a rejection-sampling stage; for a DPO stage, pairs built with :func:`trl_safeppo.pairs.build_pairs` from its
  scored samples, with options under ``pairs:``);
- a local file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``) or a directory written by ``Dataset.save_to_disk``;
- a Hugging Face Hub dataset id (``openai/gsm8k``).

The mapping form adds options: ``{path: openai/gsm8k, name: main, split: train, n: 500, columns: {question: prompt},
map: my_pkg.prepare_row}``. ``columns`` renames columns; ``map`` is a dotted path to a function applied with
``Dataset.map`` (row -> dict of new or replaced columns); ``n`` keeps the first ``n`` rows.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import RecipeError, did_you_mean

TASK_PREFIX = "task://"
# embedded task name -> "module:function(split, n=None, seed=0)"
TASKS: dict[str, str] = {"arithmetic": "trl_safeppo.tasks.arithmetic:load_arithmetic"}
TASK_SPLITS: dict[str, tuple[str, ...]] = {"arithmetic": ("sft", "rl", "eval")}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN_FORMATS = "trl_safeppo.pipeline.formats"  # the package's own `map:` functions (no listing needed)
DATASET_KEYS = ("path", "name", "split", "n", "columns", "map", "pairs")


@dataclass
class DatasetSpec:
    """A dataset reference, normalized. ``kind`` is ``task``, ``file``, ``hub`` or ``previous``."""

    kind: str
    path: str
    split: str | None = None
    name: str | None = None
    n: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    map: str | None = None
    pairs: dict[str, Any] = field(default_factory=dict)  # build_pairs options (DPO from `previous` scored samples)

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("name", self.name), ("split", self.split), ("n", self.n)) if v)
        return f"{self.kind}:{self.path}{extra}"


def import_object(dotted: str, *, where: str, what: str = "object", must_call: bool = True) -> Any:
    """Import ``pkg.module.attr`` (or ``pkg.module:attr``); one RecipeError if it does not import or call.

    For the package's own tables (stage configs, runners, task loaders); never for a path from a recipe (those go
    through :func:`find_map_function`, :func:`find_callback_class` and ``rewards.resolve``)."""
    if not isinstance(dotted, str) or not dotted.strip():
        raise RecipeError(where, f"{what} {dotted!r} is not a dotted path", "write e.g. my_package.module.function")
    text = dotted.strip()
    module_name, sep, attr = text.partition(":") if ":" in text else text.rpartition(".")
    if not module_name or not attr:
        raise RecipeError(where, f"{what} {dotted!r} is not a dotted path", "write e.g. my_package.module.function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RecipeError(where, f"{what} {dotted!r} does not import: {err}",
                          "check the spelling and that the module is installed / on PYTHONPATH") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            known = [n for n in dir(obj) if not n.startswith("_")]
            raise RecipeError(where, f"{what} {dotted!r}: {module_name!r} has no attribute {part!r}"
                              f"{did_you_mean(part, known)}", "check the name after the last dot")
        obj = getattr(obj, part)
    if must_call and not callable(obj):
        raise RecipeError(where, f"{what} {dotted!r} is a {type(obj).__name__}, not a callable",
                          "point at a function or a class")
    return obj


def find_map_function(dotted: str, *, where: str, imports: list | None = None) -> Any:
    """A dataset's ``map:``: a plain Python function defined in the module the path names, which must be listed
    under the recipe's ``imports:`` (or be one of :mod:`trl_safeppo.pipeline.formats`, e.g. ``gsm8k_r1``). Found
    without calling anything; builtins, classes and re-exported functions (``from os import remove``) are refused.
    Raises :class:`trl_safeppo.dotted.DottedPathError`."""
    import inspect

    from ..dotted import DottedPathError, find, split

    fix = "write a function `def prepare(row): return {...}` in a module beside the recipe and list it under `imports:`"
    fn = find(dotted, where=where, what="map function", imports=imports, fix=fix, trusted=(BUILTIN_FORMATS,))
    module = split(dotted)[0]
    if not inspect.isfunction(fn) or fn.__module__ != module:
        origin = getattr(fn, "__module__", None) or type(fn).__module__
        raise DottedPathError(where, f"map function {dotted!r} is a {type(fn).__name__} from {origin!r}, not a "
                              f"Python function defined in {module!r}", fix)
    return fn


def find_callback_class(dotted: str, *, where: str, imports: list | None = None) -> type:
    """A stage's callback: a ``transformers.TrainerCallback`` subclass (instantiated later without arguments) in a
    module listed under ``imports:`` or from transformers, TRL or trl_safeppo. Raises ``DottedPathError``."""
    from transformers import TrainerCallback

    from ..dotted import DottedPathError, find, split

    module = split(dotted)[0] if isinstance(dotted, str) else ""
    trusted = module.split(".")[0] in ("transformers", "trl")
    fix = "point at a transformers.TrainerCallback subclass in a module listed under `imports:`"
    cls = find(dotted, where=where, what="callback", imports=None if trusted else imports, fix=fix)
    if not (isinstance(cls, type) and issubclass(cls, TrainerCallback)):
        raise DottedPathError(where, f"callback {dotted!r} is a {type(cls).__name__}, not a TrainerCallback "
                              "subclass", fix)
    return cls


def normalize(value: Any, *, where: str, shared: dict[str, Any] | None = None, _depth: int = 0) -> DatasetSpec:
    """Turn a recipe's dataset value into a :class:`DatasetSpec` (no I/O except checking a local path exists)."""
    shared = shared or {}
    if isinstance(value, str) and value in shared and _depth == 0:
        return normalize(shared[value], where=f"data.{value}", shared=shared, _depth=1)
    options: dict[str, Any] = {}
    if isinstance(value, dict):
        for key in value:
            if key not in DATASET_KEYS:
                hint = did_you_mean(str(key), DATASET_KEYS)
                raise RecipeError(f"{where}.{key}", f"unknown dataset key {key!r}{hint}",
                                  f"use: {', '.join(DATASET_KEYS)}")
        if "path" not in value:
            raise RecipeError(where, "a dataset mapping needs `path`", "add `path:` (file, Hub id or task://...)")
        options = {k: v for k, v in value.items() if k != "path"}
        value = value["path"]
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(where, f"dataset {value!r} is not a dataset reference",
                          "write a data key, task://arithmetic/<split>, a path, a Hub id or `previous`")
    value = value.strip()
    n = options.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise RecipeError(f"{where}.n", f"n={n!r} must be a positive integer", "write e.g. `n: 500`, or remove it")
    columns = options.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise RecipeError(f"{where}.columns", f"columns={columns!r} must map old names to new names",
                          "write e.g. `columns: {question: prompt}`")
    for key in ("split", "name", "map"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise RecipeError(f"{where}.{key}", f"{key}={options[key]!r} must be a string", f"quote the {key}")
    common = dict(n=n, columns=dict(columns), map=options.get("map"), name=options.get("name"))
    pairs = options.get("pairs") or {}
    if pairs and value != "previous":
        raise RecipeError(f"{where}.pairs", "`pairs` options apply to `path: previous` (pairs built from scored "
                          "samples)", "remove `pairs`, or use `path: previous` after a rejection_sampling stage")
    if not isinstance(pairs, dict):
        raise RecipeError(f"{where}.pairs", f"pairs={pairs!r} must be a mapping of build_pairs options",
                          "write e.g. `pairs: {min_margin: 0.5, max_pairs_per_prompt: 2}`")
    if value == "previous":
        if pairs:
            from ..pairs import build_pairs_with_report
            from .schema import check_args

            pairs = check_args(pairs, build_pairs_with_report, where=f"{where}.pairs", what="trl_safeppo.pairs.build_pairs",
                               reserved={"scored": "the scored samples come from the earlier stage",
                                         "provenance": "the runner fills the provenance"})
        return DatasetSpec(kind="previous", path="previous", pairs=dict(pairs), **common)
    if value.startswith(TASK_PREFIX):
        task, _, split = value[len(TASK_PREFIX):].partition("/")
        split = split or options.get("split")
        if task not in TASKS:
            raise RecipeError(where, f"unknown embedded task {task!r}{did_you_mean(task, list(TASKS))}",
                              f"use one of: {', '.join(TASK_PREFIX + t for t in TASKS)}")
        if split not in TASK_SPLITS[task]:
            raise RecipeError(where, f"{value!r} has no split {split!r}",
                              f"write one of: {', '.join(f'{TASK_PREFIX}{task}/{s}' for s in TASK_SPLITS[task])}")
        return DatasetSpec(kind="task", path=task, split=split, **common)
    from ..models import looks_like_path

    local = Path(value).expanduser()
    if local.exists() or looks_like_path(value) or local.suffix in FILE_BUILDERS:
        if not local.exists():
            raise RecipeError(where, f"dataset file {value!r} does not exist",
                              "check the path (relative paths are relative to the current directory)")
        if local.is_file():
            if local.suffix not in FILE_BUILDERS:
                raise RecipeError(where, f"dataset file {value!r} has an unsupported extension {local.suffix!r}",
                                  f"use one of {', '.join(FILE_BUILDERS)} or a save_to_disk directory")
            try:
                with open(local, "rb") as handle:
                    handle.read(1)
            except OSError as err:
                raise RecipeError(where, f"dataset file {value!r} is not readable ({err.strerror})",
                                  "check the file's permissions") from None
        elif not (local / "dataset_info.json").exists() and not (local / "state.json").exists():
            raise RecipeError(where, f"dataset directory {value!r} was not written by Dataset.save_to_disk",
                              "point at a data file (.jsonl, .csv, .parquet) or a save_to_disk directory")
        return DatasetSpec(kind="file", path=str(local), split=options.get("split"), **common)
    from ..models import _HUB_ID

    if not _HUB_ID.match(value):
        raise RecipeError(where, f"dataset {value!r} is neither an existing path nor a valid Hub dataset id",
                          "write a data key, task://arithmetic/<split>, a path, a Hub id or `previous`")
    return DatasetSpec(kind="hub", path=value, split=options.get("split") or "train", **common)


def load(spec: DatasetSpec, *, where: str, seed: int = 0, previous_data: dict[str, str] | None = None,
         previous_kind: str | None = None):
    """Load a dataset. ``previous`` reads ``previous_data[previous_kind]`` (a save_to_disk directory)."""
    import datasets

    if spec.kind == "task":
        loader = import_object(TASKS[spec.path].replace(":", "."), where=where, what="task loader")
        ds = loader(spec.split, n=spec.n, seed=seed)
    elif spec.kind == "previous":
        path = (previous_data or {}).get(previous_kind or "")
        if path is None:
            raise RecipeError(where, f"the previous stage produced no {previous_kind!r} data",
                              "put a stage that produces it (rejection_sampling) before this one, or name a dataset")
        ds = load_saved(path, where=where, kind=previous_kind or "", keep_in_memory=True)  # no cache files
    elif spec.kind == "file":
        path = Path(spec.path)
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split or "train"]
        else:
            ds = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split=spec.split or "train")
    else:  # hub
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    if spec.columns:
        missing = [c for c in spec.columns if c not in ds.column_names]
        if missing:
            raise RecipeError(f"{where}.columns", f"cannot rename {missing}: the dataset has columns "
                              f"{ds.column_names}", "rename columns that exist")
        ds = ds.rename_columns(spec.columns)
    if spec.map:
        from ..dotted import DottedPathError

        try:
            fn = find_map_function(spec.map, where=f"{where}.map")
        except DottedPathError as err:
            raise RecipeError(err.where, err.problem, err.fix) from None
        ds = ds.map(fn)
    if spec.n is not None and spec.kind != "task":
        ds = ds.select(range(min(spec.n, len(ds))))
    return ds


def load_saved(path: str, *, where: str, kind: str, keep_in_memory: bool = False):
    """``datasets.load_from_disk`` of data an earlier stage wrote; one RecipeError naming that stage and the path
    when it cannot be read (a corrupted or half-deleted folder), instead of pyarrow's traceback."""
    import datasets

    try:
        return datasets.load_from_disk(path, keep_in_memory=keep_in_memory)
    except Exception as err:
        parts = Path(path).parts
        stage = parts[parts.index("stages") + 1] if "stages" in parts[:-1] else "the stage that wrote it"
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise RecipeError(where, f"the {kind} data written by stage {stage} cannot be read ({path}: "
                          f"{type(err).__name__}: {first})",
                          f"rerun stage {stage}: delete its folder (or pass --restart)") from None


def check_columns(ds, accepted: tuple[tuple[str, ...], ...], *, where: str, stage_type: str) -> None:
    """Raise one RecipeError unless the dataset has every column of at least one accepted set."""
    if not accepted:
        return
    have = set(ds.column_names)
    if any(set(group) <= have for group in accepted):
        return
    wanted = " or ".join("{" + ", ".join(group) + "}" for group in accepted)
    best = min(accepted, key=lambda g: len(set(g) - have))
    missing = [c for c in best if c not in have]
    raise RecipeError(where, f"a {stage_type} stage needs the columns {wanted}; the dataset has {sorted(have)} "
                      f"(missing {missing})", "rename columns with `columns: {old: new}` or add a `map:` function")
