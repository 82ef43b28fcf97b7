"""Recipe files: the YAML format, ``key.path=value`` overrides, ``${...}`` references and schema validation.

A recipe is plain YAML read with ``yaml.safe_load`` (no tags, no code). Loading goes in four steps, each of which
fails with one :class:`RecipeError` naming the file, the key path (``stages[3].args.learning_rate``), the bad
value and the fix:

1. parse the YAML;
2. apply command-line overrides (``stages.grpo.args.max_steps=5``; the value is parsed as YAML, so ``5`` is an int
   and ``[a, b]`` a list);
3. resolve ``${a.b.c}`` references (a whole-string reference keeps the referenced value's type; inside a longer
   string it is formatted in) and ``${env:NAME}`` / ``${env:NAME,default}``;
4. check the structure against :class:`Recipe` / :class:`StageSpec` (unknown keys get a "did you mean").

The deeper checks that need the stage types (each stage's ``args`` against its TRL config dataclass, datasets,
rewards, imports) are in :mod:`trl_safeppo.pipeline.preflight`. Nothing here imports torch or TRL. The YAML reader
caps the file's size and its alias expansion (:func:`trl_safeppo.safe_yaml.safe_yaml_load`), so a "billion laughs" file fails at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..safe_yaml import MAX_RECIPE_BYTES, MAX_RECIPE_NODES, RecipeError, safe_yaml_load  # noqa: F401 (re-exported)

STAGE_TYPE_NAMES = ("sft", "ppo", "grpo", "rejection_sampling", "dpo", "eval")
HANDOFF_POLICIES = ("merge", "keep")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key_error(where: str, key: str, known: Sequence[str], what: str) -> RecipeError:
    hint = did_you_mean(key, known)
    return RecipeError(
        f"{where}.{key}" if where else key,
        f"unknown key {key!r} in {what}{hint}",
        f"use one of: {', '.join(sorted(known))}" if len(known) <= 30 else "see docs/recipes.md for the accepted keys",
    )


# ---------------------------------------------------------------------------------------------------------------
# The schema
@dataclass
class StageSpec:
    """One stage of a recipe.

    Parameters:
        type (`str`):
            What the stage does: `sft`, `ppo`, `grpo`, `rejection_sampling`, `dpo` or `eval`.
        name (`str` or `None`, defaults to `None`):
            Directory and display name (`stages/NN-<name>`); defaults to the type, suffixed `-2`, `-3` when repeated.
        init (`str` or `None`, defaults to `None`):
            The policy the stage starts from: `previous` (the final checkpoint of the previous stage; the default,
            except for the first stage, which starts from the recipe's `model`), or an explicit model
            (`tiny://...`, a path or a Hub id).
        dataset (`str`, `dict` or `None`, defaults to `None`):
            Training data: a key of the recipe's `data`, `task://arithmetic/<split>`, a local file, a Hub dataset
            (`{path: org/name, split: train, ...}`) or `previous` (the data the previous stage produced).
        args (`dict`, defaults to `{}`):
            Fields of the stage's config dataclass (e.g. `trl.SFTConfig`, `SafeGRPOConfig`); every field can be set.
        reward (`str`, `list` or `None`, defaults to `None`):
            Overrides the recipe's shared `reward` for this stage.
        rails (`dict`, defaults to `{}`):
            Overrides merged on top of the recipe's shared `rails` (a `RailsConfig` dict).
        tripwires (`list`, defaults to `[]`):
            Tripwires of this stage, `[{detector, action, params}]` (the config's `tripwires` field; RL stages).
        gate (`dict`, defaults to `{}`):
            Gate that must pass before the next stage starts (a `monitoring.gates.GateConfig` dict).
        peft (`dict` or `None`, defaults to `None`):
            LoRA settings (`peft.LoraConfig` fields) plus `handoff: merge|keep`: merge the adapter into the weights
            handed to the next stage (default), or keep it as an adapter.
        callbacks (`list[str]`, defaults to `[]`):
            Dotted paths to `transformers.TrainerCallback` subclasses (in a module of the recipe's `imports:`, or
            from transformers / TRL), instantiated without arguments and added to the stage's trainer.
            Dotted paths to `transformers.TrainerCallback` classes (or factories), instantiated without arguments
            and added to the stage's trainer.
        scale_with_world_size (`bool` or `None`, defaults to `None`):
            Overrides the recipe's `scale_with_world_size` for this stage (`None`: the recipe's value).
    """

    type: str = field(metadata={"help": "What the stage does: sft, ppo, grpo, rejection_sampling, dpo or eval."})
    name: str | None = field(
        default=None, metadata={"help": "Directory and display name; defaults to the type (`-2`, `-3` if repeated)."}
    )
    init: str | None = field(
        default=None,
        metadata={"help": "Starting policy: `previous` (default after the first stage) or tiny://..., a path, a Hub id."},
    )
    dataset: Any = field(
        default=None,
        metadata={"help": "Training data: a `data` key, task://arithmetic/<split>, a file, a Hub dataset, `previous`."},
    )
    args: dict = field(default_factory=dict, metadata={"help": "Fields of the stage's config dataclass."})
    reward: Any = field(default=None, metadata={"help": "Overrides the recipe's shared reward spec for this stage."})
    rails: dict = field(default_factory=dict, metadata={"help": "Merged on top of the recipe's shared rails."})
    tripwires: list = field(default_factory=list, metadata={"help": "Tripwires: [{detector, action, params}]."})
    gate: dict = field(default_factory=dict, metadata={"help": "Gate checked before the next stage (GateConfig)."})
    peft: dict | None = field(
        default=None, metadata={"help": "LoRA settings plus `handoff: merge|keep` for the next stage."}
    )
    callbacks: list = field(
        default_factory=list, metadata={"help": "Dotted paths to TrainerCallback classes added to the trainer."}
    )
    scale_with_world_size: bool | None = field(
        default=None, metadata={"help": "Overrides the recipe's scale_with_world_size for this stage (null: inherit)."}
    )

    @property
    def handoff(self) -> str:
        return (self.peft or {}).get("handoff", "merge")


@dataclass
class Recipe:
    """A whole recipe: the shared settings and the ordered stages.

    Parameters:
        name (`str`):
            Name of the run (shown in the report).
        model (`str`):
            The starting policy: `tiny://<name>`, a local model directory or a Hub id.
        output_dir (`str`):
            The run directory (manifest.json, recipe.yaml, stages/NN-name/...). Relative paths are relative to the
            current directory.
        stages (`list[StageSpec]`):
            The stages, run in order.
        seed (`int`, defaults to `0`):
            Seed of every stage (a stage's `args.seed` overrides it) and of data subsampling.
        data (`dict`, defaults to `{}`):
            Named datasets that stages refer to by key (`dataset: rl`), each in any accepted dataset form.
        reward (`str`, `list` or `None`, defaults to `None`):
            The shared reward spec for `trl_safeppo.rewards.resolve`: built-in rule names or dotted paths to
            callables, with weights.
        rails (`dict`, defaults to `{}`):
            The shared `RailsConfig` dict (reward clipping, normalization, length rails, KL control, tripwires).
        eval (`dict`, defaults to `{}`):
            Held-out evaluation run after every training stage (arguments of
            `monitoring.evaluation.evaluate_heldout`, e.g. `{dataset: task://arithmetic/eval, n: 100}`).
        probes (`list` or `dict`, defaults to `[]`):
            Probe prompts answered greedily after every training stage (written to `probes.json`): a list of
            prompts, or `{prompts: [...], system_prompt: ..., max_new_tokens: ...}` (`monitoring.probes.run_probes`).
        description (`str`, defaults to `""`):
            Free text, shown in the report.
        final (`str`, defaults to `"last"`):
            The run's final model, which an `eval` stage after the last training stage evaluates and the manifest
            records under `final`: `last` (the last model handed on) or `best_heldout` (of the models handed on, the
            one with the best held-out accuracy; needs the `eval` block).
        self_test (`bool`, defaults to `True`):
            Pre-flight runs the reward's verifier self-test (`trl_safeppo.rewards.selftest.check_rewards`) on the
            first rows of each rewarded stage's dataset: a gold answer must pass, a wrong one must fail. Set `false`
            for a reward without a gold answer.
        imports (`list[str]`, defaults to `[]`):
            Your Python modules (e.g. `my_rules`, found in the installed packages, the recipe's folder or the working
            directory), imported by the pre-flight. Every dotted path in the recipe (custom rewards, `map:`
            functions, callbacks) must name something in one of them; importing them is the only code a recipe runs
            of its own accord.
        scale_with_world_size (`bool`, defaults to `True`):
            `true`: `per_device_train_batch_size` is per process, so the global batch grows with the number of
            processes (accelerate's convention). `false`: each stage's args describe the run at one process; under
            N processes the runner divides `per_device_train_batch_size` by N, so the global batch, the number of
            optimizer steps and the completions per RL step stay those of one process. A stage's
            `scale_with_world_size` overrides it.
        source (`str` or `None`):
            Set by the loader: the file the recipe came from (not a YAML key).
    """

    name: str = field(metadata={"help": "Name of the run (shown in the report)."})
    model: str = field(metadata={"help": "Starting policy: tiny://<name>, a local model directory or a Hub id."})
    output_dir: str = field(metadata={"help": "The run directory (manifest.json, recipe.yaml, stages/...)."})
    stages: list[StageSpec] = field(metadata={"help": "The stages, run in order."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage and of data subsampling."})
    data: dict = field(default_factory=dict, metadata={"help": "Named datasets that stages refer to by key."})
    reward: Any = field(
        default=None, metadata={"help": "Shared reward spec (rule names or dotted paths, with weights and gates)."}
    )
    rails: dict = field(default_factory=dict, metadata={"help": "Shared RailsConfig dict."})
    eval: dict = field(default_factory=dict, metadata={"help": "Held-out evaluation after every training stage."})
    probes: list | dict = field(
        default_factory=list, metadata={"help": "Probe prompts answered greedily after every training stage."}
    )
    description: str = field(default="", metadata={"help": "Free text, shown in the report."})
    final: str = field(
        default="last",
        metadata={"help": "The run's final model: `last` (the last handed on) or `best_heldout` (best held-out "
                          "accuracy among the models handed on)."},
    )
    self_test: bool = field(
        default=True, metadata={"help": "Run the reward's verifier self-test in pre-flight (false: no gold answer)."}
    )
    imports: list = field(
        default_factory=list,
        metadata={"help": "Your modules (beside the recipe or installed) that dotted paths may name, e.g. [my_rules]."},
    )
    scale_with_world_size: bool = field(
        default=True,
        metadata={"help": "true: per-device batches (the global batch grows with the processes); false: the args "
                          "describe one process and the runner divides per_device_train_batch_size by their number."},
    )
    source: str | None = field(
        default=None, repr=False, compare=False, metadata={"help": "Where the recipe was loaded from (not a key)."}
    )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("stages", "source")}
        out["stages"] = [dataclasses.asdict(stage) for stage in self.stages]
        return out


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "source")
STAGE_KEYS = tuple(f.name for f in dataclasses.fields(StageSpec))
_REQUIRED_RECIPE = ("name", "model", "output_dir", "stages")


# ---------------------------------------------------------------------------------------------------------------
# Key paths: shared by overrides and ${...} references. Segments are dict keys, list indices, or for `stages` the
# name (or type, when unique) of a stage.
def split_path(path: str) -> list[str]:
    parts = [p for p in path.strip().split(".")]
    if not path.strip() or any(not p for p in parts):
        raise RecipeError(path, f"malformed key path {path!r}", "write dot-separated keys, e.g. stages.0.args.max_steps")
    return parts


def stage_names(raw_stages: Sequence[Any]) -> list[str | None]:
    """Each stage's name: its `name`, else its type for the first stage of that type and `<type>-<k>` for the k-th
    (`sft`, `sft-2`, ...). The parser and key paths (overrides, `${...}`) share this rule."""
    names: list[str | None] = []
    types: list[Any] = []
    for raw in raw_stages:
        stype = raw.get("type") if isinstance(raw, Mapping) else None
        name = raw.get("name") if isinstance(raw, Mapping) else None
        if name is None and isinstance(stype, str):
            count = types.count(stype)
            name = stype if count == 0 else f"{stype}-{count + 1}"
        names.append(name)
        types.append(stype)
    return names


def _list_index(container: list, segment: str, where: str, parent_key: str | None) -> int:
    if re.fullmatch(r"-?\d+", segment):
        index = int(segment)
        if -len(container) <= index < len(container):
            return index % len(container)
        raise RecipeError(where, f"index {index} is out of range (the list has {len(container)} items)",
                          f"use an index from 0 to {len(container) - 1}")
    if parent_key == "stages":  # a stage by name (given or default), or by type when only one stage has it
        labels = stage_names(container)
        if segment in labels:
            return labels.index(segment)
        types = [s.get("type") if isinstance(s, Mapping) else None for s in container]
        if types.count(segment) == 1:
            return types.index(segment)
        raise RecipeError(where, f"no stage named {segment!r}{did_you_mean(segment, [str(x) for x in labels])}",
                          f"use a stage index (0 to {len(container) - 1}) or one of the names {labels}")
    raise RecipeError(where, f"{segment!r} is not a list index", "use an integer index")


def get_path(tree: Any, path: str) -> Any:
    node, parent_key, done = tree, None, []
    for segment in split_path(path):
        where = ".".join(done + [segment])
        if isinstance(node, Mapping):
            if segment not in node:
                raise RecipeError(where, f"no key {segment!r}{did_you_mean(segment, [str(k) for k in node])}",
                                  f"existing keys here: {', '.join(map(str, node)) or '(none)'}")
            node = node[segment]
        elif isinstance(node, list):
            node = node[_list_index(node, segment, where, parent_key)]
        else:
            raise RecipeError(where, f"cannot look up {segment!r} inside a {type(node).__name__}",
                              "check the key path")
        parent_key = segment
        done.append(segment)
    return node


def set_path(tree: dict, path: str, value: Any) -> None:
    """Set ``path`` in ``tree``; missing intermediate dict keys are created (so overrides can add args)."""
    segments = split_path(path)
    node, parent_key = tree, None
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        where = ".".join(segments[: i + 1])
        if isinstance(node, dict):
            if last:
                node[segment] = value
                return
            if node.get(segment) is None:
                node[segment] = {}
            node = node[segment]
        elif isinstance(node, list):
            index = _list_index(node, segment, where, parent_key)
            if last:
                node[index] = value
                return
            node = node[index]
        else:
            raise RecipeError(where, f"cannot set {segment!r} inside a {type(node).__name__}", "check the key path")
        parent_key = segment


# ---------------------------------------------------------------------------------------------------------------
# Reading YAML safely: a recipe is small. Aliases (`*a`) share one node, so ten nested anchors of ten aliases each
# ("billion laughs") parse in a blink but expand to 10^10 nodes once anything walks the tree; the expanded size is
# counted on the node graph (each node once) before anything is built.
def parse_override(text: str) -> tuple[str, Any]:
    """``"stages.1.args.max_steps=5"`` -> ``("stages.1.args.max_steps", 5)``; the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise RecipeError("", f"override {text!r} has no '='", "write overrides as key.path=value, e.g. seed=1")
    key, raw = text.split("=", 1)
    try:
        value = safe_yaml_load(raw, what=f"override {key.strip()!r}") if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(key, f"override value {raw!r} is not valid YAML ({err})", "quote it") from None
    return key.strip(), value


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    for text in overrides:
        key, value = parse_override(text)
        set_path(tree, key, value)
    return tree


# ---------------------------------------------------------------------------------------------------------------
# ${...} references
_REF = re.compile(r"\$\{([^${}]+)\}")


def resolve_references(tree: Any) -> Any:
    """Replace every ``${key.path}`` / ``${env:NAME[,default]}`` in the strings of ``tree`` (a fresh copy)."""

    def lookup(ref: str, where: str, stack: tuple[str, ...]) -> Any:
        ref = ref.strip()
        if ref.startswith("env:"):
            name, _, default = ref[4:].partition(",")
            if name in os.environ:
                return os.environ[name]
            if _:
                return default
            raise RecipeError(where, f"environment variable {name!r} in ${{{ref}}} is not set",
                              f"export {name}=... or write ${{env:{name},default}}")
        if ref in stack:
            raise RecipeError(where, f"circular reference: {' -> '.join(stack + (ref,))}",
                              "make one of these a literal value")
        try:
            target = get_path(tree, ref)
        except RecipeError as err:
            raise RecipeError(where, f"reference ${{{ref}}} does not resolve: {err.problem}", err.fix) from None
        return walk(target, ref, stack)

    def walk(node: Any, where: str, stack: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k), stack) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}.{i}", stack) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            chain = stack if not where or where in stack else stack + (where,)
            whole = _REF.fullmatch(node.strip())
            if whole:
                return lookup(whole.group(1), where, chain)
            return _REF.sub(lambda m: str(lookup(m.group(1), where, chain)), node)
        return node

    return walk(tree, "", ())


# ---------------------------------------------------------------------------------------------------------------
# Structure
def _check_keys(mapping: Mapping, known: Sequence[str], where: str, what: str) -> None:
    for key in mapping:
        if key not in known:
            raise unknown_key_error(where, str(key), known, what)


def _expect(value: Any, types: type | tuple[type, ...], where: str, what: str, fix: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        raise RecipeError(where, f"{what} must be {_type_words(types)}, got {type(value).__name__} {value!r}", fix)
    return value


def _type_words(types) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true or false", type(None): "null"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def build_recipe(tree: Any, source: str | None = None) -> Recipe:
    """Check the structure of a parsed (overridden, reference-resolved) recipe and build the dataclasses."""
    try:
        recipe = _build_recipe(tree, source)
        _check_final_and_on_fail(tree, recipe)
        return recipe
    except RecipeError as err:
        raise err.with_source(source) if source and not err.source else err


_TRAINS_POLICY = ("sft", "ppo", "grpo", "dpo")  # stage types that hand on a new model


def _article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _check_final_and_on_fail(tree: dict, recipe: Recipe) -> None:
    """The recipe's `final` and each stage's `gate.on_fail` (monitoring.gates.FINAL_POLICIES / ON_FAIL)."""
    from ..monitoring.gates import FINAL_POLICIES, ON_FAIL

    final = tree.get("final", "last")
    if final not in FINAL_POLICIES:
        raise RecipeError("final", f"unknown value {final!r}{did_you_mean(str(final), FINAL_POLICIES)}",
                          f"use one of the accepted values: {', '.join(FINAL_POLICIES)}")
    if final == "best_heldout" and not (recipe.eval or {}).get("dataset"):
        raise RecipeError("final", "`final: best_heldout` chooses by the held-out evaluation, and the recipe has no "
                          "`eval.dataset`", "add `eval: {dataset: ...}` or write `final: last`")
    recipe.final = final
    trained_before = False
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}] ({stage.name}).gate.on_fail"
        on_fail = (stage.gate or {}).get("on_fail", "stop")
        if on_fail not in ON_FAIL:
            raise RecipeError(where, f"unknown value {on_fail!r}{did_you_mean(str(on_fail), ON_FAIL)}",
                              f"use one of the accepted values: {', '.join(ON_FAIL)}")
        if on_fail == "carry_previous":
            if stage.type not in _TRAINS_POLICY:
                raise RecipeError(where, f"`carry_previous` on {_article(stage.type)} stage, which trains no model (the "
                                  "policy passes through it): there is nothing to carry over", "write `on_fail: stop`")
            if not trained_before:
                raise RecipeError(where, "`carry_previous` on the first training stage: there is no previous model "
                                  "to carry over", "write `on_fail: stop` (or remove it) on this stage")
        trained_before = trained_before or stage.type in _TRAINS_POLICY


def _build_recipe(tree: Any, source: str | None) -> Recipe:
    if not isinstance(tree, dict):
        raise RecipeError("", f"a recipe must be a YAML mapping at the top level, got {type(tree).__name__}",
                          "start from recipes/demo.yaml")
    _check_keys(tree, RECIPE_KEYS, "", "the recipe")
    for key in _REQUIRED_RECIPE:
        if tree.get(key) in (None, "", []):
            raise RecipeError(key, f"the required key {key!r} is missing or empty", f"add `{key}:` (see docs/recipes.md)")
    _expect(tree["name"], str, "name", "name", "write a short name, e.g. `name: demo`")
    _expect(tree["model"], str, "model", "model", "write tiny://arithmetic, a local model directory or a Hub id")
    _expect(tree["output_dir"], str, "output_dir", "output_dir", "write a directory, e.g. `output_dir: runs/demo`")
    seed = _expect(tree.get("seed", 0), int, "seed", "seed", "write an integer, e.g. `seed: 0`")
    data = _expect(tree.get("data") or {}, dict, "data", "data", "write a mapping of name -> dataset")
    rails = _expect(tree.get("rails") or {}, dict, "rails", "rails", "write a RailsConfig mapping")
    eval_cfg = _expect(tree.get("eval") or {}, dict, "eval", "eval", "write a mapping, e.g. {dataset: ..., n: 100}")
    probes = _expect(tree.get("probes") or [], (list, dict), "probes", "probes",
                     "write a list of prompts, or {prompts: [...], system_prompt: ...}")
    if "probes" in tree and isinstance(tree["probes"], list):  # written, so it must hold prompts: [] is a mistake
        from ..monitoring.probes import validate_probes

        try:
            validate_probes(tree["probes"])
        except ValueError as err:
            raise RecipeError("", str(err),
                              "list at least one prompt string, or remove the `probes` key") from None
    description = _expect(tree.get("description") or "", str, "description", "description", "write a string")
    self_test = _expect(tree.get("self_test", True), bool, "self_test", "self_test", "write true or false")
    imports = _expect(tree.get("imports") or [], list, "imports", "imports",
                      "write a list of module names, e.g. `imports: [my_rules]`")
    for j, module in enumerate(imports):
        from ..dotted import DottedPathError, check_module_name

        try:
            check_module_name(module, where=f"imports[{j}]")
        except DottedPathError as err:
            raise RecipeError(err.where, err.problem, err.fix) from None
    scale = _expect(tree.get("scale_with_world_size", True), bool, "scale_with_world_size", "scale_with_world_size",
                    "write true (per-device batches) or false (the args describe one process)")
    stages_raw = _expect(tree["stages"], list, "stages", "stages", "write a list of stages, each with a `type`")

    stages: list[StageSpec] = []
    seen: dict[str, int] = {}
    default_names = stage_names(stages_raw)
    for i, raw in enumerate(stages_raw):
        where = f"stages[{i}]"
        _expect(raw, dict, where, "a stage", "write a mapping with at least `type: sft|ppo|grpo|...`")
        _check_keys(raw, STAGE_KEYS, where, "a stage")
        stype = raw.get("type")
        if stype is None:
            raise RecipeError(f"{where}.type", "the stage has no type", f"add `type:` ({', '.join(STAGE_TYPE_NAMES)})")
        if stype not in STAGE_TYPE_NAMES:
            raise RecipeError(f"{where}.type", f"unknown stage type {stype!r}{did_you_mean(str(stype), STAGE_TYPE_NAMES)}",
                              f"use one of: {', '.join(STAGE_TYPE_NAMES)}")
        name = default_names[i]
        _expect(name, str, f"{where}.name", "name", "write a short name such as `grpo`")
        if not _NAME.match(name):
            raise RecipeError(f"{where}.name", f"name {name!r} is not usable as a directory name",
                              "use letters, digits, '-', '_' and '.'")
        if name in seen:
            raise RecipeError(f"{where}.name", f"name {name!r} is already used by stages[{seen[name]}]",
                              "give each stage a distinct `name`")
        seen[name] = i
        where = f"stages[{i}] ({name})"
        init = raw.get("init")
        if init is not None:
            _expect(init, str, f"{where}.init", "init", "write `previous` or a model (tiny://..., a path or a Hub id)")
        if init == "previous" and i == 0:
            raise RecipeError(f"{where}.init", "`init: previous` on the first stage: there is no previous stage",
                              "remove `init` (the first stage starts from the recipe's `model`) or name a model")
        if raw.get("dataset") is not None:
            _expect(raw["dataset"], (str, dict), f"{where}.dataset", "dataset", "write a data key, a path, a "
                    "task://arithmetic/<split> id, `previous`, or a mapping {path: ..., split: ...}")
        for key in ("args", "rails", "gate"):
            _expect(raw.get(key) or {}, dict, f"{where}.{key}", key, f"write `{key}:` as a mapping")
        _expect(raw.get("tripwires") or [], list, f"{where}.tripwires", "tripwires",
                "write a list of {detector, action, params}")
        callbacks = _expect(raw.get("callbacks") or [], list, f"{where}.callbacks", "callbacks",
                            "write a list of dotted paths to TrainerCallback classes")
        for j, cb in enumerate(callbacks):
            _expect(cb, str, f"{where}.callbacks[{j}]", "a callback", "write a dotted path, e.g. my_pkg.MyCallback")
        stage_scale = raw.get("scale_with_world_size")
        if stage_scale is not None:
            _expect(stage_scale, bool, f"{where}.scale_with_world_size", "scale_with_world_size",
                    "write true, false, or remove it (the recipe's value)")
        peft = raw.get("peft")
        if peft is not None:
            _expect(peft, dict, f"{where}.peft", "peft", "write a mapping of peft.LoraConfig fields plus handoff")
            handoff = peft.get("handoff", "merge")
            if handoff not in HANDOFF_POLICIES:
                raise RecipeError(f"{where}.peft.handoff", f"unknown hand-off policy {handoff!r}",
                                  f"use one of: {', '.join(HANDOFF_POLICIES)}")
        stages.append(
            StageSpec(
                type=stype,
                name=name,
                init=init,
                dataset=raw.get("dataset"),
                args=dict(raw.get("args") or {}),
                reward=raw.get("reward"),
                rails=dict(raw.get("rails") or {}),
                tripwires=list(raw.get("tripwires") or []),
                gate=dict(raw.get("gate") or {}),
                peft=dict(peft) if peft is not None else None,
                callbacks=list(callbacks),
                scale_with_world_size=stage_scale,
            )
        )
    return Recipe(
        name=tree["name"], model=tree["model"], output_dir=tree["output_dir"], stages=stages, seed=seed, data=data,
        reward=tree.get("reward"), rails=rails, eval=eval_cfg, probes=probes, description=description, self_test=self_test,
        imports=list(imports), scale_with_world_size=scale, source=source,
    )


def builtin_recipe_folder() -> Path:
    """Where the shipped recipes are: the repository's ``recipes/``, installed with the wheel as
    ``trl_safeppo/recipes/`` (with their ``accelerate/`` launch configs inside)."""
    from importlib.resources import files

    return Path(str(files("trl_safeppo") / "recipes"))


def builtin_recipes() -> dict[str, Path]:
    """The shipped recipes by name (``demo``, ...): the YAML files of :func:`builtin_recipe_folder`."""
    folder = builtin_recipe_folder()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find_recipe(path: str | os.PathLike) -> Path:
    """The recipe file for ``path``: the file itself when it exists; otherwise, for a bare name (``demo``,
    ``demo.yaml``) or the repository-relative ``recipes/<name>.yaml``, the recipe shipped in the package, so that a
    pip-installed ``trl-safeppo run demo`` works without the repository."""
    source = os.fspath(path)
    file = Path(source)
    if file.is_file():
        return file
    shipped = builtin_recipes()
    if file.parent in (Path("."), Path("recipes")) and file.suffix in ("", ".yaml") and file.stem in shipped:
        return shipped[file.stem]
    names = ", ".join(shipped) or "none installed"
    raise RecipeError(
        "", f"recipe file {source!r} does not exist",
        f"pass a YAML file, or a built-in recipe by name ({names}; files in {builtin_recipe_folder()}), "
        "e.g. `trl-safeppo run demo`",
    )


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or a built-in recipe by name, :func:`find_recipe`), apply ``key.path=value`` overrides,
    resolve ``${...}`` and check the structure."""
    import yaml

    file = find_recipe(path)
    source = os.fspath(file)
    try:
        tree = safe_yaml_load(file.read_text())
    except RecipeError as err:
        raise err.with_source(source) from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError("", f"cannot read the recipe ({err})", "check the file's permissions", source=source) from None
    except yaml.YAMLError as err:
        raise RecipeError("", f"not valid YAML: {err}", "fix the YAML syntax at the line shown", source=source) from None
    return recipe_from_dict(tree, overrides, source=source)


def recipe_from_dict(tree: Any, overrides: Sequence[str] = (), source: str | None = None) -> Recipe:
    import copy

    tree = copy.deepcopy(tree)
    try:
        if isinstance(tree, dict):
            apply_overrides(tree, overrides)
        tree = resolve_references(tree)
    except RecipeError as err:
        raise err.with_source(source) if source else err
    return build_recipe(tree, source)


def dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None, width=120)
