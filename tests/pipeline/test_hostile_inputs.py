"""Hostile and unlucky inputs to `trl-safeppo run` (issue 21, parts 2 and 3): each is refused with one line naming the
field, the value and the fix, and leaves no side effect; a damaged run directory is detected, never trusted.

Recipes are checked with `--check` / `preflight` where that suffices; the run-directory cases train tiny://debug
for one or two steps, or build the broken folder by hand."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from trl_safeppo.dotted import HOW_TO_REGISTER
from trl_safeppo.pipeline.preflight import check_output_dir, preflight
from trl_safeppo.pipeline.recipe import RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]


def micro(**extra):
    tree = {
        "name": "micro",
        "model": "tiny://debug",
        "output_dir": "/tmp/unused",
        "reward": [{"name": "format", "weight": 0.5}, {"name": "math"}],
        "stages": [
            {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 16}, "args": {"max_steps": 1}},
            {"type": "grpo", "dataset": {"path": "task://arithmetic/rl", "n": 8},
             "args": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4}},
        ],
    }
    tree.update(extra)
    return tree


def refused(tree, *, source: str = "r.yaml") -> str:
    with pytest.raises(RecipeError) as info:
        preflight(recipe_from_dict(tree, source=source), check_hardware=False)
    message = str(info.value)
    assert "\n" not in message
    return message


def cli_check(path: Path, capsys) -> str:
    from trl_safeppo.cli import main

    assert main(["run", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def fresh_module(folder: Path, source: str) -> str:
    """Write a module with a unique name into ``folder``; returns its name (sys.modules never holds a stale one)."""
    name = f"user_mod_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return name


# ---------------------------------------------------------------------------------------------------------------
# 21.2: recipes never execute code at check time
def test_os_system_reward_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "x"
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(micro(reward=[{"name": "os.system", "command": f"touch {marker}"}])))
    err = cli_check(path, capsys)
    assert err == (f"trl-safeppo run: error: {path}: reward[0].name: reward 'os.system' is in the standard library "
                   f"('os'), which a recipe may not call. Fix: {HOW_TO_REGISTER}")
    assert not marker.exists()


@pytest.mark.parametrize("dotted,module", [
    ("subprocess.run", "subprocess"), ("shutil.rmtree", "shutil"), ("builtins.eval", "builtins"),
    ("pathlib.Path.unlink", "pathlib.Path"), ("importlib.import_module", "importlib"), ("ctypes.CDLL", "ctypes"),
    ("socket.create_connection", "socket"), ("urllib.request.urlopen", "urllib.request"), ("pty.spawn", "pty"),
    ("multiprocessing.Process", "multiprocessing"), ("sys.exit", "sys"), ("http.server:test", "http.server"),
    ("os:system", "os"),
])
def test_standard_library_process_file_and_network_functions_are_refused(dotted, module):
    message = refused(micro(reward=[{"name": "math"}, {"name": dotted, "weight": 1.0}]))
    assert message == (f"r.yaml: reward[1].name: reward {dotted!r} is in the standard library ({module!r}), which a "
                       f"recipe may not call. Fix: {HOW_TO_REGISTER}")


def test_unlisted_module_is_never_imported(tmp_path):
    marker = tmp_path / "imported"
    name = fresh_module(tmp_path, f"""
        open({str(marker)!r}, "w").write("top-level code ran")
        def reward(prompts, completions, **kwargs):
            return [1.0 for _ in completions]
    """)
    message = refused(micro(reward=f"{name}.reward"), source=str(tmp_path / "r.yaml"))
    assert message == (f"{tmp_path / 'r.yaml'}: reward.name: reward '{name}.reward': module {name!r} is not listed "
                       f"under the recipe's `imports:`. Fix: add `imports: [{name}]` at the top of the recipe")
    assert not marker.exists() and name not in sys.modules


def test_unmarked_function_in_a_listed_module_is_not_called(tmp_path):
    marker = tmp_path / "called"
    name = fresh_module(tmp_path, f"""
        import os
        from os import remove as helper

        def unmarked(**options):
            open({str(marker)!r}, "w").write("called")
            return lambda prompts, completions, **kw: [1.0 for _ in completions]
    """)
    source = str(tmp_path / "r.yaml")
    message = refused(micro(imports=[name], reward=[{"name": f"{name}:unmarked", "k": 1}]), source=source)
    assert message == (f"{source}: reward[0].name: reward '{name}:unmarked' is a callable without the reward mark, so "
                       f"it is not called. Fix: {HOW_TO_REGISTER}")
    # the same module's names as a callback and as a dataset map: declared for neither job
    tree = micro(imports=[name])
    tree["stages"][0]["callbacks"] = [f"{name}:unmarked"]
    assert refused(tree, source=source) == (
        f"{source}: stages[0] (sft).callbacks[0]: callback '{name}:unmarked' is a function, not a TrainerCallback "
        "subclass. Fix: point at a transformers.TrainerCallback subclass in a module listed under `imports:`")
    tree = micro(imports=[name])
    tree["stages"][0]["dataset"]["map"] = f"{name}:helper"  # os.remove, re-exported
    assert refused(tree, source=source) == (
        f"{source}: stages[0] (sft).dataset.map: map function '{name}:helper' is a builtin_function_or_method from "
        f"'posix', not a Python function defined in {name!r}. Fix: write a function `def prepare(row): return "
        "{...}` in a module beside the recipe and list it under `imports:`")
    assert not marker.exists()


def test_callbacks_and_maps_from_the_standard_library_are_refused():
    tree = micro()
    tree["stages"][0]["callbacks"] = ["os.fork"]
    assert refused(tree) == ("r.yaml: stages[0] (sft).callbacks[0]: callback 'os.fork' is in the standard library "
                             "('os'), which a recipe may not call. Fix: point at a transformers.TrainerCallback "
                             "subclass in a module listed under `imports:`")
    tree = micro()  # the package's own functions other than its row formats are not row functions either
    tree["stages"][0]["dataset"]["map"] = "trl_safeppo.fileio.remove_temporaries"
    assert refused(tree) == ("r.yaml: stages[0] (sft).dataset.map: map function "
                             "'trl_safeppo.fileio.remove_temporaries': module 'trl_safeppo.fileio' is not listed under "
                             "the recipe's `imports:`. Fix: add `imports: [trl_safeppo.fileio]` at the top of the recipe")
    tree = micro()
    tree["stages"][0]["dataset"]["map"] = "os.remove"
    assert refused(tree).startswith("r.yaml: stages[0] (sft).dataset.map: map function 'os.remove' is in the "
                                    "standard library ('os'), which a recipe may not call. Fix: ")


def test_imports_name_modules_not_the_standard_library(tmp_path, monkeypatch):
    assert refused(micro(imports=["os"])) == ("r.yaml: imports[0]: 'os' is a standard-library module; `imports:` is "
                                              "for your own modules. Fix: remove it: a recipe never needs the "
                                              "standard library")
    folder, cwd = tmp_path / "recipes", tmp_path / "cwd"
    folder.mkdir(), cwd.mkdir()
    monkeypatch.chdir(cwd)
    message = refused(micro(imports=["my_rules_nowhere"]), source=str(folder / "r.yaml"))
    assert message == (f"{folder / 'r.yaml'}: imports[0]: cannot import module 'my_rules_nowhere': no "
                       "my_rules_nowhere.py in the installed packages, the recipe's folder or the working directory. "
                       f"Fix: put my_rules_nowhere.py in {folder} or {cwd}, or install the package that provides it "
                       "(pip install -e .), or add its folder to PYTHONPATH")


def test_unlisted_files_beside_the_recipe_are_never_found(tmp_path, monkeypatch):
    # Listing `my_rules` lets the pre-flight find my_rules.py beside the recipe, and nothing else there: a file named
    # like an optional package the libraries probe for (bitsandbytes.py, flash_attn.py) must not become importable.
    import importlib.util

    marker = tmp_path / "imported"
    listed = fresh_module(tmp_path, "from trl_safeppo.rewards import reward_function\n")
    unlisted = fresh_module(tmp_path, f"open({str(marker)!r}, 'w').write('unlisted module ran')\n")
    monkeypatch.chdir(tmp_path)
    preflight(recipe_from_dict(micro(imports=[listed]), source=str(tmp_path / "r.yaml")), check_hardware=False)
    assert listed in sys.modules and str(tmp_path) not in sys.path
    assert importlib.util.find_spec(unlisted) is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(unlisted)
    assert not marker.exists()


def test_a_helper_module_beside_the_recipe_is_listed_too(tmp_path, monkeypatch):
    # my_rules.py imports helpers.py beside it: helpers must be listed as well, and the message says so
    helper = fresh_module(tmp_path, "LIMIT = 3\n")
    rules = fresh_module(tmp_path, f"import {helper}\n")
    monkeypatch.chdir(tmp_path)
    source = str(tmp_path / "r.yaml")
    assert refused(micro(imports=[rules]), source=source) == (
        f"{source}: imports[0]: module {rules!r} imports {helper!r}, which is beside the recipe ({tmp_path}) but not "
        f"listed under `imports:`. Fix: add it: `imports: [{rules}, {helper}]`")
    preflight(recipe_from_dict(micro(imports=[rules, helper]), source=source), check_hardware=False)
    assert sys.modules[rules].__dict__[helper].LIMIT == 3


def test_a_packages_command_line_module_is_refused(tmp_path):
    # `pkg.__main__` runs the package's command line when imported (pygments, tqdm, numpy.f2py, ...).
    marker = tmp_path / "ran"
    package = tmp_path / f"pkg_{uuid.uuid4().hex[:8]}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    source = str(tmp_path / "r.yaml")
    assert refused(micro(imports=[f"{package.name}.__main__"]), source=source) == (
        f"{source}: imports[0]: imports: '{package.name}.__main__' names a '__main__' module, which runs a program "
        "when imported (a package's command line). Fix: name the module that defines your code, e.g. my_rules")
    assert refused(micro(imports=[package.name], reward=f"{package.name}.__main__:main"), source=source) == (
        f"{source}: reward.name: reward '{package.name}.__main__' names a '__main__' module, which runs a program "
        "when imported (a package's command line). Fix: name the module that defines your code, e.g. my_rules")
    tree = micro()
    tree["stages"][0]["callbacks"] = ["transformers.__main__:Callback"]
    assert "names a '__main__' module" in refused(tree, source=source)
    assert not marker.exists()


def test_rule_module_beside_the_recipe_plugs_in_through_the_cli(tmp_path, monkeypatch, capsys):
    # issue 24.4: `my_rules.py` next to the recipe, run from another folder
    folder, cwd = tmp_path / "project", tmp_path / "cwd"
    folder.mkdir(), cwd.mkdir()
    name = fresh_module(folder, """
        from trl_safeppo.rewards import reward_function

        @reward_function
        def short(prompts, completions, completion_ids=None, **kwargs):
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            return [1.0 if len(t) < 200 else 0.0 for t in texts]
    """)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(micro(imports=[name], output_dir="runs/x",
                                         reward=[{"name": "math"}, {"name": f"{name}:short", "weight": 0.5}])))
    monkeypatch.chdir(cwd)
    from trl_safeppo.cli import main

    assert main(["run", str(path), "--check"]) == 0
    assert capsys.readouterr().out.strip().endswith("pre-flight passed")
    sys.modules.pop(name, None)


BOMB = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)])


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    # 9 levels of 9 aliases: 9^10 (3.5 billion) strings once expanded; the node graph has 100 nodes
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + "\n" + yaml.safe_dump(micro()))
    assert cli_check(path, capsys) == (
        f"trl-safeppo run: error: {path}: the recipe expands to more than 100000 nodes through its aliases "
        "(&anchor / *alias). Fix: write the repeated parts out (or use ${...} references); a recipe is data, not a "
        "data set")
    path.write_text("loop: &loop [*loop]\n" + yaml.safe_dump(micro()))
    assert cli_check(path, capsys).endswith(f"{path}: the recipe has a recursive alias (a collection that contains "
                                            "itself). Fix: write the repeated parts out (or use ${...} references); "
                                            "a recipe is data, not a data set")
    # ordinary anchors are fine: a block written once and used twice
    text = yaml.safe_dump(micro(), sort_keys=False).replace("args:\n      max_steps: 1\n",
                                                            "args: &one\n      max_steps: 1\n", 1)
    path.write_text(text.replace("args:\n      max_steps: 1\n      per_device", "args:\n      <<: *one\n"
                                                                                "      per_device", 1))
    assert [s.args["max_steps"] for s in load_recipe(path).stages] == [1, 1]


MERGE_BOMB = "\n".join(["m0: &m0 {k: v}"] + [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}], k{i}: v}}"
                                                for i in range(1, 10)])


def test_merge_key_bombs_python_tags_and_other_yaml_readers(tmp_path, capsys, monkeypatch):
    # `<<` merge keys copy every key of each merged mapping: 9 levels of 9 merges is 9^9 pairs, counted like aliases
    path = tmp_path / "merge.yaml"
    path.write_text(MERGE_BOMB + "\n" + yaml.safe_dump(micro()))
    assert "the recipe expands to more than 100000 nodes through its aliases" in cli_check(path, capsys)
    # tags that build Python objects are not YAML data: nothing runs
    marker = tmp_path / "pwned"
    path.write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n" + yaml.safe_dump(micro()))
    with pytest.raises(RecipeError, match="could not determine a constructor for the tag .*python/object/apply"):
        load_recipe(path)
    assert not marker.exists()
    # every other YAML the package reads has the same caps: check-rewards' --reward file, a rails YAML file
    from trl_safeppo.rails.config import RailsConfig
    from trl_safeppo.rewards.selftest import load_reward_spec

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB + "\nreward: math\n")
    with pytest.raises(RecipeError, match="expands to more than 100000 nodes"):
        load_reward_spec(str(bomb))
    with pytest.raises(RecipeError, match="the rails YAML expands to more than 100000 nodes"):
        RailsConfig.from_any(str(bomb))


STEPS_RANGE = "-1 (train by epochs) or an integer from 1 to 10000000"


@pytest.mark.parametrize("stage,key,value,accepted", [
    (0, "max_steps", -5, STEPS_RANGE),
    (0, "max_steps", 0, STEPS_RANGE),
    (0, "max_steps", 10**12, STEPS_RANGE),
    (0, "learning_rate", float("nan"), "a finite number >= 0"),
    (0, "learning_rate", -1.0e-3, "a finite number >= 0"),
    (0, "num_train_epochs", 0, "a number > 0 and at most 100000"),
    (1, "beta", -0.1, "a finite number >= 0"),
    (0, "weight_decay", float("inf"), "a finite number >= 0"),
    (0, "adam_beta1", float("nan"), "a finite number"),  # no known range: finite is still required
    # ceilings: 2**20 = 1048576 per batch count, 2**24 = 16777216 tokens
    (1, "gradient_accumulation_steps", 2**20 + 1, "an integer from 1 to 1048576"),
    (1, "per_device_train_batch_size", 0, "an integer from 1 to 1048576"),
    (1, "max_completion_length", 10**9, "an integer from 1 to 16777216"),
])
def test_numbers_are_validated_at_preflight(stage, key, value, accepted):
    tree = micro()
    tree["stages"][stage]["args"][key] = value
    name = tree["stages"][stage]["type"]
    assert refused(tree) == (f"r.yaml: stages[{stage}] ({name}).args.{key}: {key}={value!r} is out of range "
                             f"(accepted: {accepted}). Fix: set `{key}` to {accepted}")


def test_numbers_written_as_yaml_text(tmp_path, capsys):
    # what a user types: `max_steps: 1e12` is a string in YAML 1.1, `.nan` a float
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(micro()).replace("max_steps: 1\n", "max_steps: 1e12\n", 1))
    assert cli_check(path, capsys) == (f"trl-safeppo run: error: {path}: stages[0] (sft).args.max_steps: expected an "
                                       "integer, got str '1e12'. Fix: write an integer (see SFTConfig)")
    tree = micro()
    tree["stages"][0]["args"]["learning_rate"] = ".nan"
    path.write_text(yaml.safe_dump(tree).replace("'.nan'", ".nan"))
    assert cli_check(path, capsys).endswith("stages[0] (sft).args.learning_rate: learning_rate=nan is out of range "
                                            "(accepted: a finite number >= 0). Fix: set `learning_rate` to a finite "
                                            "number >= 0")
    assert refused(micro(seed=-1)) == ("r.yaml: seed: seed=-1 is out of range (accepted: an integer from 0 to "
                                       "2**32 - 1). Fix: set `seed` to an integer from 0 to 2**32 - 1")
    assert refused(micro(eval={"dataset": "task://arithmetic/eval", "max_new_tokens": 0})) == (
        "r.yaml: eval.max_new_tokens: max_new_tokens=0 is out of range (accepted: an integer from 1 to 16777216). "
        "Fix: set `max_new_tokens` to an integer from 1 to 16777216")


OUTSIDE_FIX = ("use a folder below the working directory (e.g. runs/my-run), or an absolute path outside system "
               "folders")


def test_output_dir_outside_the_working_directory_or_in_system_folders(tmp_path, monkeypatch):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    up = os.path.normpath(work / "../../etc")
    assert refused(micro(output_dir="../../etc")) == (
        f"r.yaml: output_dir: output_dir '../../etc' is {up}, outside the working directory {work}. Fix: use a "
        "folder below the working directory (e.g. runs/my-run), or write the absolute path if you mean it")
    assert refused(micro(output_dir=".")).startswith(f"r.yaml: output_dir: output_dir '.' is {work}, the working "
                                                     "directory itself. Fix: ")
    cases = {"/etc/trl": "/etc/trl, inside the system folder /etc", "/": "/, the root folder",
             "/usr/lib/x": "/usr/lib/x, inside the system folder /usr",
             "/proc/self": f"{Path('/proc/self').resolve()}, inside the system folder /proc",
             "/root/.ssh/run": "/root/.ssh/run, inside a hidden folder of a home",
             # another user's home and its dotfiles (the run may be root); shared top-level folders themselves
             "/home/alice": "/home/alice, a home folder itself",
             "/home/alice/.ssh": "/home/alice/.ssh, inside a hidden folder of a home",
             "/tmp": "/tmp, a shared top-level folder itself (the run would write its manifest and stages among "
                     "everything else there)",
             "/opt": "/opt, a shared top-level folder itself (the run would write its manifest and stages among "
                     "everything else there)"}
    for value, what in cases.items():
        assert refused(micro(output_dir=value)) == f"r.yaml: output_dir: output_dir {value!r} is {what}. Fix: {OUTSIDE_FIX}"
    (work / "runs").symlink_to("/etc")  # a symlink below the working directory that points into /etc
    assert refused(micro(output_dir="runs/x")) == (
        f"r.yaml: output_dir: output_dir 'runs/x' is /etc/x, inside the system folder /etc. Fix: {OUTSIDE_FIX}")
    assert not Path("/etc/trl").exists() and not Path("/etc/x").exists()
    (work / "runs").unlink()
    preflight(recipe_from_dict(micro(output_dir="runs/ok")), check_hardware=False)  # below the working directory
    preflight(recipe_from_dict(micro(output_dir=str(tmp_path / "abs"))), check_hardware=False)  # explicit absolute
    for value in ("/home/alice/runs/x", "/opt/runs/x"):  # below them is fine
        assert str(check_output_dir(value)) == value


# ---------------------------------------------------------------------------------------------------------------
# 21.3: the run directory is the source of truth
def one_stage(out: Path, **args) -> dict:
    return {"name": "one", "model": "tiny://debug", "output_dir": str(out),
            "stages": [{"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 8},
                        "args": {"max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1, **args}}]}


def write(tmp_path: Path, tree: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


HOLDER = ("import sys, time; from trl_safeppo.pipeline.lock import RunLock; lock = RunLock(sys.argv[1]); "
          "lock.acquire(); print('held', flush=True); time.sleep(600)")


def test_second_run_on_a_locked_folder_refuses_at_once_then_takes_over_a_dead_holders_lock(tmp_path):
    from trl_safeppo.pipeline.lock import RunLock
    from trl_safeppo.pipeline.runner import run_recipe

    out = tmp_path / "run"
    keep = out / "stages" / "01-sft" / "keep.txt"  # what the first run is writing
    keep.parent.mkdir(parents=True)
    keep.write_text("in progress")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        body = json.loads((out / ".lock").read_text())
        with pytest.raises(RecipeError) as info:
            run_recipe(str(write(tmp_path, one_stage(out))))
        assert str(info.value) == (f"output_dir: output_dir {out} is in use by another run: PID {holder.pid} on host "
                                   f"{socket.gethostname()}, started {body['started_at']}. Fix: wait for that run to "
                                   "finish (or stop it), or choose another output_dir")
        assert keep.read_text() == "in progress" and not (out / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs, the body stays behind
        holder.wait()
    lock = RunLock(out)
    assert lock.acquire() == (f"took over the lock of an earlier run that did not end cleanly (PID {holder.pid}, "
                              f"started {body['started_at']}; that process is gone)")
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (out / ".lock").read_text() == ""  # released cleanly: the next run has nothing to take over
    assert RunLock(out).acquire() is None


def test_the_lock_is_released_when_the_run_raises_before_its_stages(tmp_path, monkeypatch):
    # An error after the lock was taken (here: reading the old run's state) must not leave the folder locked for
    # the rest of this process (a notebook keeps the traceback, and with it the lock, alive).
    from trl_safeppo.pipeline import runner
    from trl_safeppo.pipeline.lock import RunLock

    def broken(*args, **kwargs):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(runner, "reconcile", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk went away") as info:
        runner.run_recipe(str(write(tmp_path, one_stage(out))))
    assert info.traceback  # the traceback (and the frames in it) still alive here
    assert (out / ".lock").read_text() == ""  # released cleanly
    lock = RunLock(out)
    assert lock.acquire() is None
    lock.release()


def test_lock_left_by_another_host_is_taken_over_with_an_explanation(tmp_path):
    from trl_safeppo.pipeline.lock import RunLock

    (tmp_path / ".lock").write_text(json.dumps({"pid": 4242, "host": "node-7", "started_at": "2026-01-01T00:00:00Z"}))
    lock = RunLock(tmp_path)
    assert lock.acquire() == ("took over a lock left by PID 4242 on another host, node-7 (started "
                              "2026-01-01T00:00:00Z): the lock was free, so that run has ended or its host lost the "
                              "lock; if it is still writing on node-7, stop it now")
    lock.release()


def _checkpoint(folder: Path, step: int, *, state: str | None = "ok", weights: str = "ok") -> None:
    from safetensors.torch import save_file
    import torch

    folder.mkdir(parents=True)
    if state == "ok":
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    elif state is not None:
        (folder / "trainer_state.json").write_text(state)
    if weights in ("ok", "truncated"):
        save_file({"w": torch.ones(64, 64)}, str(folder / "model.safetensors"))
        if weights == "truncated":  # a full disk: the write stopped part-way
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def test_incomplete_checkpoints_are_set_aside_and_the_newest_complete_one_is_chosen(tmp_path):
    from trl_safeppo.pipeline.checkpoints import last_complete_checkpoint, set_aside_incomplete

    stage = tmp_path / "stages" / "01-sft"
    _checkpoint(stage / "checkpoint-2", 2)
    _checkpoint(stage / "checkpoint-4", 4, state=None)             # killed before trainer_state.json
    _checkpoint(stage / "checkpoint-6", 6, weights="truncated")    # full disk in the weights
    _checkpoint(stage / "checkpoint-8", 8, state='{"global_st')    # killed inside trainer_state.json
    _checkpoint(stage / "checkpoint-10", 10, weights="none")        # the state, but no weights
    assert last_complete_checkpoint(stage) == str(stage / "checkpoint-2")
    notes = set_aside_incomplete(stage)
    moved = sorted(p.name.rsplit("-", 1)[0] for p in (stage / "incomplete").iterdir())
    assert moved == ["checkpoint-10", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    reasons = [n.split(": moved to")[0] for n in notes]
    # the truncated file: 8 bytes of length, the JSON header, then 64 x 64 float32 = 16384 bytes of data expected
    half = next((stage / "incomplete").glob("checkpoint-6-*")) / "model.safetensors"
    header = 8 + int.from_bytes(half.read_bytes()[:8], "little")
    assert reasons == ["checkpoint-10 is incomplete (no weights)",
                       "checkpoint-8 is incomplete (trainer_state.json is unreadable)",
                       f"checkpoint-6 is incomplete (model.safetensors is {half.stat().st_size} bytes, its header says "
                       f"{header + 64 * 64 * 4})",
                       "checkpoint-4 is incomplete (no trainer_state.json)"]
    assert all(n.split(": moved to ")[1].startswith("incomplete/checkpoint-") for n in notes)
    assert [p.name for p in stage.glob("checkpoint-*")] == ["checkpoint-2"]


def test_an_rl_checkpoint_without_the_packages_state_marker_is_incomplete(tmp_path):
    # trainer_state.json comes before the on_save callbacks that add the rails, critic and ladder state; a kill in
    # between leaves no trl_safeppo_state.json, and a PPO / GRPO / DPO stage must not resume from it
    from trl_safeppo.pipeline.checkpoints import STATE_MARKER, last_complete_checkpoint, set_aside_incomplete

    stage = tmp_path / "stages" / "02-grpo"
    _checkpoint(stage / "checkpoint-2", 2)
    (stage / "checkpoint-2" / STATE_MARKER).write_text('{"complete": true}')
    _checkpoint(stage / "checkpoint-4", 4)  # killed after trainer_state.json, before the package's state
    assert last_complete_checkpoint(stage) == str(stage / "checkpoint-4")  # an SFT stage needs no marker
    assert last_complete_checkpoint(stage, (STATE_MARKER,)) == str(stage / "checkpoint-2")
    notes = set_aside_incomplete(stage, (STATE_MARKER,))
    assert [n.split(": moved to")[0] for n in notes] == [
        f"checkpoint-4 is incomplete (no {STATE_MARKER} (killed while the trainer added its own state))"]


def test_resume_skips_a_checkpoint_killed_while_saving(tmp_path, capsys):
    from trl_safeppo.pipeline.runner import run_recipe

    out = tmp_path / "run"
    recipe = write(tmp_path, one_stage(out, max_steps=2, save_steps=1))
    assert run_recipe(str(recipe)) == 0
    stage = out / "stages" / "01-sft"
    # as after a kill during checkpoint-3: the manifest says running, the folder has weights but no trainer state
    m = json.loads((out / "manifest.json").read_text())
    m["stages"][0]["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    (stage / "checkpoint-3").mkdir()
    (stage / "checkpoint-3" / "config.json").write_text("{}")
    capsys.readouterr()
    assert run_recipe(str(recipe)) == 0
    said = "".join(capsys.readouterr())
    assert "stage 1 (sft): checkpoint-3 is incomplete (no trainer_state.json): moved to incomplete/checkpoint-3-" in said
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"][0]["status"] == "completed" and m["stages"][0]["timings"]["resumed_from"] == "checkpoint-2"


def test_a_changed_output_stops_the_next_stage_naming_the_stage_and_file(tmp_path):
    from trl_safeppo.pipeline.runner import run_recipe

    out = tmp_path / "run"
    tree = one_stage(out)
    tree["stages"].append({**json.loads(json.dumps(tree["stages"][0])), "name": "sft-2"})
    recipe = write(tmp_path, tree)
    assert run_recipe(str(recipe)) == 0
    weights = out / "stages" / "01-sft" / "final" / "model.safetensors"
    recorded = json.loads((out / "manifest.json").read_text())["stages"][0]["outputs"]["final"]["files"]
    with open(weights, "r+b") as handle:  # 2 MB of random bytes written into the weights
        handle.seek(1024)
        handle.write(os.urandom(2 << 20))
    now = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    with pytest.raises(RecipeError) as info:  # stage 2 changed, so it would train again on the damaged weights
        run_recipe(str(recipe), ["stages.sft-2.args.learning_rate=1.0e-4"])
    assert str(info.value) == (
        f"stages[1] (sft-2): final/ of stage 01-sft changed on disk since that stage finished: {weights} changed "
        f"(sha256 {now}..., recorded {recorded['model.safetensors']}...). Fix: restore the file, or rerun stage "
        f"01-sft (delete {out / 'stages/01-sft'} or pass --restart)")
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and m["stages"][1]["status"] == "pending" and m["stages"][1]["timings"]["attempts"] == 0


POISON = """
    import torch
    from transformers import TrainerCallback

    class PoisonWeights(TrainerCallback):
        '''NaN into the weights before the second step, so that its loss is NaN (a diverged run).'''
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))
"""


def test_a_stage_with_non_finite_loss_is_failed_not_completed(tmp_path, monkeypatch):
    from trl_safeppo.pipeline.runner import run_recipe

    name = fresh_module(tmp_path, POISON)
    out = tmp_path / "run"
    tree = one_stage(out, max_steps=2)
    tree["imports"] = [name]
    tree["stages"][0]["callbacks"] = [f"{name}:PoisonWeights"]
    with pytest.raises(RecipeError) as info:
        run_recipe(str(write(tmp_path, tree)))
    assert str(info.value) == ("stages[0] (sft): the training loss is not finite (loss=nan at step 2); the stage "
                               "failed. Fix: lower the learning rate or check the data; the previous stage's final/ "
                               "is the last good policy")
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and m["stages"][0]["status"] == "failed"
    assert m["stages"][0]["error"] == str(info.value).split(": ", 1)[1]
    sys.modules.pop(name, None)


def test_non_finite_loss_detection():
    from trl_safeppo.pipeline.runner import nonfinite_loss

    assert nonfinite_loss([{"loss": 1.0, "step": 1}, {"grad_norm": float("nan"), "step": 2}]) is None
    assert nonfinite_loss([{"loss": 1.0, "step": 1}, {"ppo/value_loss": float("inf"), "step": 2}]) == \
        "ppo/value_loss=inf at step 2"
    assert nonfinite_loss([{"train_loss": float("nan"), "step": 5}]) == "train_loss=nan at step 5"


def test_corrupted_rejection_sampling_data_names_the_stage_and_file(tmp_path):
    import datasets

    from trl_safeppo.pipeline import data as data_mod

    sft = tmp_path / "run" / "stages" / "03-rejection_sampling" / "data" / "sft"
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "completion": ["1", "2"]}).save_to_disk(str(sft))
    (arrow,) = sft.glob("*.arrow")
    arrow.write_bytes(os.urandom(arrow.stat().st_size))
    with pytest.raises(RecipeError) as info:
        data_mod.load(data_mod.DatasetSpec(kind="previous", path="previous"), where="stages[3] (sft-rs).dataset",
                      previous_data={"sft": str(sft)}, previous_kind="sft")
    message = str(info.value)
    assert message.startswith(f"stages[3] (sft-rs).dataset: the sft data written by stage 03-rejection_sampling "
                              f"cannot be read ({sft}: ")
    assert message.endswith("). Fix: rerun stage 03-rejection_sampling: delete its folder (or pass --restart)")
    assert "\n" not in message and "Traceback" not in message


def test_corrupted_rejection_sampling_data_stops_the_stage_that_reads_it(tmp_path):
    from trl_safeppo.pipeline.runner import run_recipe

    name = fresh_module(tmp_path, """
        from trl_safeppo.rewards import reward_function

        @reward_function
        def anything(prompts, completions, **kwargs):
            return [1.0 for _ in completions]
    """)
    out = tmp_path / "run"
    tree = {"name": "rs", "model": "tiny://debug", "output_dir": str(out), "imports": [name],
            "reward": f"{name}:anything", "self_test": False,
            "stages": [{"type": "rejection_sampling", "dataset": {"path": "task://arithmetic/rl", "n": 2},
                        "args": {"num_completions": 2, "max_new_tokens": 4, "progress": False}},
                       {"type": "sft", "dataset": "previous",
                        "args": {"max_steps": 1, "per_device_train_batch_size": 2}}]}
    recipe = write(tmp_path, tree)
    assert run_recipe(str(recipe)) == 0
    sft = out / "stages" / "01-rejection_sampling" / "data" / "sft"
    (arrow,) = sft.glob("*.arrow")
    recorded = json.loads((out / "manifest.json").read_text())["stages"][0]["outputs"]["data"]["sft"]["files"]
    arrow.write_bytes(os.urandom(arrow.stat().st_size))  # the same size, other bytes
    now = hashlib.sha256(arrow.read_bytes()).hexdigest()[:16]
    with pytest.raises(RecipeError) as info:
        run_recipe(str(recipe), ["stages.sft.args.learning_rate=1.0e-4"])
    assert str(info.value) == (
        f"stages[1] (sft): data/sft of stage 01-rejection_sampling changed on disk since that stage finished: {arrow} "
        f"changed (sha256 {now}..., recorded {recorded[arrow.name]}...). Fix: restore the file, or rerun stage "
        f"01-rejection_sampling (delete {out / 'stages/01-rejection_sampling'} or pass --restart)")
    sys.modules.pop(name, None)
