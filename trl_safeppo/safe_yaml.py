"""Reading user-written YAML safely, for every file the package reads (recipes, rails files, reward specs,
rejection sampling's ``--config``): :func:`safe_yaml_load` caps the text's size and its alias expansion, so a
"billion laughs" file fails at once with one :class:`RecipeError` instead of a hang.

The bottom of the package: it imports nothing from trl_safeppo, so rails, rewards and rejection sampling use it
without importing the pipeline above them.
"""

from __future__ import annotations

from typing import Any


class RecipeError(ValueError):
    """One recipe problem: where it is (file and key path), what is wrong, and how to fix it."""

    def __init__(self, where: str, problem: str, fix: str = "", *, source: str | None = None):
        self.where, self.problem, self.fix, self.source = where, problem, fix, source
        prefix = f"{source}: " if source else ""
        location = f"{where}: " if where else ""
        super().__init__(f"{prefix}{location}{problem}" + (f". Fix: {fix}" if fix else ""))

    def with_source(self, source: str) -> RecipeError:
        return RecipeError(self.where, self.problem, self.fix, source=source)


MAX_RECIPE_BYTES = 1 << 20          # 1 MiB of YAML
MAX_RECIPE_NODES = 100_000          # nodes after expanding every alias (the demo recipe has about 300)


def _expanded_nodes(root: Any, limit: int) -> int:
    """Nodes of the YAML node graph once every alias is expanded, counted in time linear in the graph's size;
    raises ``ValueError`` past ``limit`` or on a recursive alias (a collection that contains itself)."""
    import yaml

    def children(node: Any) -> list:
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative post-order: deep nesting cannot overflow the interpreter's stack here
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children(node))
            if sizes[key] > limit:
                raise ValueError(f"expands to more than {limit} nodes through its aliases (&anchor / *alias)")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ValueError("has a recursive alias (a collection that contains itself)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in sizes)
    return sizes[id(root)]


def safe_yaml_load(text: str, what: str = "the recipe") -> Any:
    """``yaml.safe_load`` with a size cap and an alias-expansion cap; one RecipeError instead of a hang."""
    import yaml

    fix = "write the repeated parts out (or use ${...} references); a recipe is data, not a data set"
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError("", f"{what} is {len(text)} characters long, over the limit of {MAX_RECIPE_BYTES}",
                          "keep data in dataset files and name them in `data:`")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            _expanded_nodes(node, MAX_RECIPE_NODES)
        except ValueError as err:
            raise RecipeError("", f"{what} {err}", fix) from None
        return loader.construct_document(node)
    except RecursionError:
        raise RecipeError("", f"{what} is nested too deeply", fix) from None
    finally:
        loader.dispose()
