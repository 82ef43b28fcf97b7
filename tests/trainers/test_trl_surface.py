"""How many private TRL / transformers members the package touches: at most 8, each listed in trainers/_trl_surface.py.

The package's source is read as syntax trees (nothing is imported or run). A private member of TRL/transformers is
a name `_x` (not a dunder) that TRL's trainers or transformers' Trainer / models / configs / tokenizers define or
assign. Touched means: read or written on another object (`trainer._metrics`), on `self` inside a class built on a
TRL/transformers class (or a mixin used with one), overridden by a method of such a class, or named in
`getattr` / `hasattr` / `setattr`. `self._x` in the package's own classes is the package's own state.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest

from trl_safeppo.trainers._trl_surface import MAX_PRIVATE_MEMBERS, PRIVATE_MEMBERS

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "trl_safeppo"


def _package_dir(name: str) -> pathlib.Path:
    return pathlib.Path(importlib.util.find_spec(name).origin).parent


def upstream_private_names() -> set[str]:
    """`_x` names that TRL's trainers and transformers' trainer, model, config and tokenizer modules define."""
    trl, tf = _package_dir("trl"), _package_dir("transformers")
    files = [*sorted((trl / "trainer").glob("*.py")), *sorted((trl / "models").glob("*.py"))]
    files += [tf / name for name in ("trainer.py", "trainer_callback.py", "training_args.py", "modeling_utils.py",
                                     "configuration_utils.py", "tokenization_utils_base.py", "processing_utils.py",
                                     "trainer_pt_utils.py")]
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _upstream_bases(tree: ast.Module) -> set[str]:
    """Names this module imports from trl or transformers."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("trl", "transformers"):
            out.update(alias.asname or alias.name for alias in node.names)
    return out


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def touched_private_members(root: pathlib.Path = PACKAGE) -> dict[str, list[str]]:
    """{private name: ["file:line", ...]} of the TRL/transformers private members the package at `root` touches."""
    upstream = upstream_private_names()
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.py"))}
    # classes built on TRL/transformers, and the mixins that sit beside such a base
    upstream_classes: set[str] = set()
    for tree in trees.values():
        imported = _upstream_bases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [_base_name(b) for b in node.bases]
                if any(b in imported for b in bases):
                    upstream_classes.add(node.name)
                    upstream_classes.update(bases)
    found: dict[str, list[str]] = {}

    def hit(name: str, path: pathlib.Path, node: ast.AST) -> None:
        if name in upstream:
            found.setdefault(name, []).append(f"{path.relative_to(root.parent)}:{node.lineno}")

    for path, tree in trees.items():
        for cls_or_mod in [tree, *[n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]]:
            on_upstream = isinstance(cls_or_mod, ast.ClassDef) and cls_or_mod.name in upstream_classes
            if isinstance(cls_or_mod, ast.ClassDef) and on_upstream:
                for item in cls_or_mod.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("__"):
                        hit(item.name, path, item)
        own_classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _base_name(node.func) in ("getattr", "hasattr", "setattr"):
                if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                    hit(node.args[1].value, path, node)
        for cls in own_classes.values():
            if cls.name not in upstream_classes:
                continue
            for node in ast.walk(cls):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    hit(node.attr, path, node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                if node.attr.startswith("_") and not node.attr.startswith("__") and _on_upstream_object(node):
                    hit(node.attr, path, node)
    return found


# receivers that hold TRL / transformers objects in this package (`trainer._metrics`, `self.trainer._metrics`, ...)
UPSTREAM_RECEIVERS = {"trainer", "model", "critic", "config", "tokenizer", "processing_class", "accelerator", "args",
                      "ref_model", "unwrapped", "scheduler", "optimizer", "state", "control"}


def _on_upstream_object(node: ast.Attribute) -> bool:
    return _base_name(node.value) in UPSTREAM_RECEIVERS


def test_private_members_touched_are_listed_and_at_most_eight():
    found = touched_private_members()
    listing = "\n".join(f"  {name}: {', '.join(sites[:4])}{' ...' if len(sites) > 4 else ''}"
                        for name, sites in sorted(found.items()))
    print(f"\n{len(found)} private TRL/transformers members touched (limit {MAX_PRIVATE_MEMBERS}):\n{listing}")
    unlisted = sorted(set(found) - set(PRIVATE_MEMBERS))
    assert not unlisted, (
        f"private TRL/transformers members touched but not listed in trainers/_trl_surface.py: {unlisted}\n{listing}"
    )
    assert len(found) <= MAX_PRIVATE_MEMBERS, f"{len(found)} private members touched (> {MAX_PRIVATE_MEMBERS}):\n{listing}"
    stale = sorted(set(PRIVATE_MEMBERS) - set(found))
    assert not stale, f"trainers/_trl_surface.py lists {stale}, which the package no longer touches: remove them"
    assert len(PRIVATE_MEMBERS) <= MAX_PRIVATE_MEMBERS


def test_the_scan_sees_a_private_member(tmp_path):
    # the scan must be able to fail: a trainer that reads GRPO's private `_tokenizer`, a callback that reads
    # `trainer._logs`, and a getattr of `_tr_loss` are each caught; the class's own `self._mine` is not
    assert {"_tokenizer", "_logs", "_tr_loss"} <= upstream_private_names()
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "probe.py").write_text(
        "from trl import GRPOTrainer\n"
        "class X(GRPOTrainer):\n"
        "    def f(self):\n"
        "        return self._tokenizer\n"
        "class Y:\n"
        "    def g(self, trainer):\n"
        "        self._mine = getattr(trainer, '_tr_loss', None)\n"
        "        return trainer._logs\n",
        encoding="utf-8",
    )
    assert touched_private_members(package) == {
        "_tokenizer": ["pkg/probe.py:4"], "_tr_loss": ["pkg/probe.py:7"], "_logs": ["pkg/probe.py:8"],
    }


@pytest.mark.parametrize("name", sorted(PRIVATE_MEMBERS))
def test_each_listed_member_is_explained_in_the_module_docstring(name):
    import trl_safeppo.trainers._trl_surface as surface

    assert f"``{name}``" in surface.__doc__
