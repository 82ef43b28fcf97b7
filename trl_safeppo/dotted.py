"""Dotted paths in a recipe (``my_rules:no_hedging``, ``my_pkg.formats.prepare_row``): found without calling
anything that was not declared for the job.

A recipe is data, but three of its fields name code: reward rules, dataset ``map:`` functions and stage
``callbacks``. The rules, shared by the reward resolver and the pipeline:

- the module must be listed under the recipe's top-level ``imports:`` (or belong to trl_safeppo itself);
  importing it runs its top level, which is the one piece of code a recipe opts into;
- nothing from the standard library (``os.system``, ``subprocess.run``, ``shutil.rmtree``, ``builtins.eval``,
  ...) is ever resolved: the module is refused by name, before any import;
- the object found must be declared for its use, checked without calling it: a reward carries the
  ``@reward_function`` / ``@reward_factory`` mark, a ``map:`` is a plain Python function defined in that very
  module, a callback is a ``transformers.TrainerCallback`` subclass.

Modules listed under ``imports:`` are searched in the installed packages, then the recipe's folder, then the working
directory. Those folders are never put on ``sys.path``: a finder at the end of ``sys.meta_path``
(:func:`add_search_folders`) finds there the listed names only, so a file beside the recipe never shadows an
installed module, and one named like a *missing* optional package (``bitsandbytes.py``, ``flash_attn.py``) is never
imported when a library probes for that package. Module names with a dunder part (``pkg.__main__``: a package's
command line, which runs at import) are refused.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# always importable without being listed: the package itself (built-in formats, rules, callbacks)
TRUSTED_PACKAGES = ("trl_safeppo",)
HOW_TO_REGISTER = ("write the function in a module beside the recipe (e.g. my_rules.py), mark it with "
                   "@trl_safeppo.rewards.reward_function (or @reward_factory for a function that builds one) and "
                   "list the module under `imports:` (docs/rewards.md, \"Writing your own rule\")")


class DottedPathError(ValueError):
    """One refused or broken dotted path: ``where`` (key path), ``problem`` and ``fix``, like a RecipeError."""

    def __init__(self, where: str, problem: str, fix: str):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(f"{where}: {problem}. Fix: {fix}")


def split(path: str) -> tuple[str, str]:
    """``"pkg.mod:attr"`` or ``"pkg.mod.attr"`` -> ``("pkg.mod", "attr")``; ``("", "")`` when it is not one."""
    text = path.strip()
    module, _, attr = text.partition(":") if ":" in text else text.rpartition(".")
    if not MODULE_NAME.match(module or "-") or not all(MODULE_NAME.match(p) for p in attr.split(".")):
        return "", ""
    return module, attr


def _dunder_part(module: str) -> str | None:
    """The first ``__x__`` part of a module name (``pip.__main__`` -> ``"__main__"``), or None."""
    return next((p for p in module.split(".") if p.startswith("__") and p.endswith("__")), None)


def _refuse_dunder(module: str, where: str, what: str) -> None:
    part = _dunder_part(module)
    if part:
        raise DottedPathError(where, f"{what} {module!r} names a {part!r} module, which runs a program when imported "
                              f"(a package's command line)", "name the module that defines your code, e.g. my_rules")


def is_stdlib(module: str) -> bool:
    """Whether ``module`` is part of Python's standard library (``os``, ``os.path``, ``subprocess``, ``builtins``)."""
    top = module.split(".", 1)[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def _listed(module: str, imports: Sequence[str], trusted: Sequence[str] = TRUSTED_PACKAGES) -> bool:
    return any(module == m or module.startswith(m + ".") for m in (*imports, *trusted))


def check_module_name(module: str, *, where: str) -> None:
    """An entry of ``imports:``: a well-formed module name outside the standard library."""
    if not isinstance(module, str) or not MODULE_NAME.match(module):
        raise DottedPathError(where, f"{module!r} is not a module name",
                              "write a module name such as my_rules or my_pkg.rules (no .py, no path)")
    if is_stdlib(module):
        raise DottedPathError(where, f"{module!r} is a standard-library module; `imports:` is for your own modules",
                              "remove it: a recipe never needs the standard library")
    _refuse_dunder(module, where, "imports:")


class _ListedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level modules a recipe lists under ``imports:`` in that recipe's folders, and nothing else.

    It sits at the end of ``sys.meta_path``, after the finder of ``sys.path``: an installed module of the same name
    always wins, and a file beside the recipe that is not listed is never found (a library that probes for an
    optional package it lacks, such as ``bitsandbytes``, does not import the recipe folder's ``bitsandbytes.py``).
    Submodules of a listed package are found through the package itself."""

    def __init__(self):
        self.folders: dict[str, list[str]] = {}  # top-level module name -> folders to search, in order

    def find_spec(self, fullname, path=None, target=None):
        if path is not None or fullname not in self.folders:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, self.folders[fullname])


_FINDER = _ListedModuleFinder()


def add_search_folders(folders: Sequence[str | Path], modules: Sequence[str]) -> None:
    """Let the top-level packages of ``modules`` (a recipe's ``imports:``) be found in ``folders``, after the
    installed packages, without putting the folders on ``sys.path`` (:class:`_ListedModuleFinder`)."""
    resolved = [str(Path(folder).resolve()) for folder in folders]
    for module in modules:
        if isinstance(module, str) and MODULE_NAME.match(module):
            top = module.split(".", 1)[0]  # the latest recipe's folders first (one process may load several)
            old = _FINDER.folders.get(top, [])
            _FINDER.folders[top] = resolved + [f for f in old if f not in resolved]
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)


def listed_folders() -> dict[str, list[str]]:
    """What :func:`add_search_folders` registered in this process (to hand to a spawned one)."""
    return {name: list(folders) for name, folders in _FINDER.folders.items()}


def install_listed_folders(folders: dict[str, list[str]]) -> None:
    """In a spawned process (``initializer=`` of a pool): find the recipe's modules as the parent does, so that a
    pickled reward function of ``my_rules`` unpickles there."""
    for name, places in folders.items():
        add_search_folders(places, [name])


def import_listed(module: str, imports: Sequence[str], folders: Sequence[str | Path], *, where: str):
    """Import a module listed under ``imports:``; one DottedPathError that names the exact fix if it fails."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            top = (err.name or "").split(".", 1)[0]
            beside = [Path(f) for f in folders if top and ((Path(f) / f"{top}.py").is_file()
                                                           or (Path(f) / top / "__init__.py").is_file())]
            if beside:  # a helper module of the user's: found only when listed, like the module itself
                raise DottedPathError(where, f"module {module!r} imports {top!r}, which is beside the recipe "
                                      f"({beside[0]}) but not listed under `imports:`",
                                      f"add it: `imports: [{', '.join(dict.fromkeys([*imports, top]))}]`") from None
            raise DottedPathError(where, f"module {module!r} imports something that is missing: {err}",
                                  f"install {err.name!r} (pip install ...) or fix the import in {module!r}") from None
        places = " or ".join(str(Path(f).resolve()) for f in folders) or "the working directory"
        file = module.replace(".", "/") + ".py"
        raise DottedPathError(where, f"cannot import module {module!r}: no {file} in the installed packages, the "
                              f"recipe's folder or the working directory",
                              f"put {file} in {places}, or install the package that provides it "
                              f"(pip install -e .), or add its folder to PYTHONPATH") from None
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise DottedPathError(where, f"importing module {module!r} failed: {type(err).__name__}: {first}",
                              f"fix the error in {module!r}") from None


def find(path: str, *, where: str, what: str, imports: Sequence[str] | None, fix: str,
         trusted: Sequence[str] = TRUSTED_PACKAGES) -> Any:
    """The object a dotted path names, found without calling anything.

    ``imports=None`` is the Python API (the caller is code already): the module is imported on demand. A list is a
    recipe's ``imports:``: the module must be in it (or in ``trusted``, by default trl_safeppo). The standard library
    is always refused.
    """
    module, attr = split(path) if isinstance(path, str) else ("", "")
    if not module:
        raise DottedPathError(where, f"{what} {path!r} is not a dotted path", f"write e.g. my_rules:my_function; {fix}")
    if is_stdlib(module):
        raise DottedPathError(where, f"{what} {path!r} is in the standard library ({module!r}), which a recipe may "
                              "not call", fix)
    _refuse_dunder(module, where, what)
    if imports is not None and not _listed(module, imports, trusted):
        listed = f" (it lists {list(imports)})" if imports else ""
        raise DottedPathError(where, f"{what} {path!r}: module {module!r} is not listed under the recipe's "
                              f"`imports:`{listed}", f"add `imports: [{module}]` at the top of the recipe")
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise DottedPathError(where, f"{what} {path!r} does not import: {err}",
                              "check the spelling and that the module is installed or beside the recipe") from None
    for part in attr.split("."):
        if part.startswith("__"):
            raise DottedPathError(where, f"{what} {path!r} names a private attribute {part!r}", fix)
        try:
            obj = getattr(obj, part)
        except AttributeError:
            from difflib import get_close_matches

            known = [n for n in dir(obj) if not n.startswith("_")]
            close = get_close_matches(part, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DottedPathError(where, f"{what} {path!r}: {module!r} has no attribute {part!r}{hint}",
                                  "check the name after the last dot") from None
    return obj
