"""tiny:// models: deterministic builds, cache fingerprint, chat template, clear errors, concurrent builds."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from trl_safeppo import tiny
from trl_safeppo.tiny import TAG_TOKENS, TINY_MODELS, build_tiny, fingerprint, is_tiny, tiny_name, tiny_path


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_SAFEPPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_names():
    assert is_tiny("tiny://debug") and not is_tiny("Qwen/Qwen2.5-0.5B") and not is_tiny(None)
    assert tiny_name("tiny://debug") == "debug"
    with pytest.raises(ValueError, match=r"'tiny://unknown-name'.*tiny://arithmetic, tiny://debug"):
        tiny_name("tiny://unknown-name")


def test_build_is_deterministic(tiny_debug_path, private_cache):
    # A forced rebuild in a fresh cache gives bit-identical weights and the same tokenizer files.
    from pathlib import Path

    cached = Path(tiny_debug_path)
    rebuilt = build_tiny("tiny://debug", force=True)
    assert rebuilt != cached and rebuilt.parent.parent == private_cache
    reference, fresh = _weights(cached), _weights(rebuilt)
    assert reference.keys() == fresh.keys()
    for key in reference:
        torch.testing.assert_close(fresh[key], reference[key], rtol=0, atol=0)
    assert (rebuilt / "tokenizer.json").read_text() == (cached / "tokenizer.json").read_text()
    # force rebuilds in place: same directory, still the same weights
    again = build_tiny("tiny://debug", force=True)
    assert again == rebuilt
    torch.testing.assert_close(_weights(again)["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])


def test_cache_path_carries_a_fingerprint_of_the_spec(monkeypatch, private_cache):
    path = tiny_path("tiny://debug")
    assert path == private_cache / "tiny" / f"debug-{fingerprint('debug')}"
    assert fingerprint("debug") == fingerprint("debug") and fingerprint("debug") != fingerprint("arithmetic")
    # a changed spec (here: another seed) must not reuse the old build
    changed = dataclasses.replace(TINY_MODELS["debug"], seed=1)
    monkeypatch.setitem(TINY_MODELS, "debug", changed)
    assert tiny_path("tiny://debug") != path


def test_cached_build_is_reused(tiny_debug_path):
    from pathlib import Path

    marker = Path(tiny_debug_path) / "config.json"
    before = marker.stat().st_mtime_ns
    assert build_tiny("tiny://debug") == Path(tiny_debug_path)
    assert marker.stat().st_mtime_ns == before


def test_chat_template_round_trip(tiny_debug_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_debug_path)
    messages = [
        {"role": "system", "content": "Think in <think> </think>, then answer in <answer> </answer>."},
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "<think>12 + 7 = 19</think><answer>19</answer>"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert text == expected
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # lossless
    # the R1 tags are single tokens and digits are one token each
    for tag in TAG_TOKENS:
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    assert tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False)["input_ids"]) == ["1", "2", "3", "4"]
    # generation prompt ends with the assistant header; EOS is the end-of-turn token
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.padding_side == "left"


def _assert_same_weights(path_a, path_b):
    a, b = _weights(path_a), _weights(path_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_concurrent_threads_agree(tiny_debug_path, private_cache):
    # Threads asking for the same uncached model at once get one complete directory, identical to a build made
    # alone: the init from torch's global RNG is serialised inside a process.
    from pathlib import Path

    results, errors = [], []

    def worker():
        try:
            results.append(build_tiny("tiny://debug"))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    built = results[0]
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no leftover temporary directory
    _assert_same_weights(built, Path(tiny_debug_path))


@pytest.mark.slow  # two fresh interpreters importing torch + transformers
def test_concurrent_processes_agree(tiny_debug_path, private_cache):
    # Two processes (as under `accelerate launch`) build at the same time: each writes a private temporary
    # directory and renames it into place; the loser keeps the winner's identical build.
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "from trl_safeppo.tiny import build_tiny; print(build_tiny('tiny://debug'))"
    env = {**os.environ, "TRL_SAFEPPO_CACHE": str(private_cache), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    # the last line: with DeepSpeed installed, importing transformers on a machine without a GPU prints DeepSpeed's
    # "Setting accelerator to CPU" warning (with a timestamp) to stdout first
    outs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(tiny_path("tiny://debug"))
    built = Path(outs[0])
    assert [p.name for p in built.parent.iterdir()] == [built.name]
    _assert_same_weights(built, Path(tiny_debug_path))


def test_cli_list(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    tiny.add_arguments(parser)
    assert tiny.run(parser.parse_args(["list"])) == 0
    out = capsys.readouterr().out
    assert "tiny://arithmetic" in out and "tiny://debug" in out


# ---------------------------------------------------------------------------------------------------------------
# Warm start: tiny://arithmetic-sft (the real build runs in the slow tier, tests/test_doc_snippets.py)
def test_warm_start_is_built_once_then_read_from_the_cache(monkeypatch, tmp_path):
    from pathlib import Path

    from trl_safeppo import tiny
    from trl_safeppo.fileio import atomic_dir
    from trl_safeppo.models import resolve_model_path

    monkeypatch.setenv("TRL_SAFEPPO_CACHE", str(tmp_path))
    builds = []

    def fake_train(name, settings, target):  # stands in for the SFT: writes a model folder the same atomic way
        builds.append((name, settings["n"]))
        with atomic_dir(target) as out:
            (Path(out) / "config.json").write_text("{}")

    monkeypatch.setattr(tiny, "_train_warm_start", fake_train)
    path = tiny.warm_start("arithmetic")
    assert isinstance(path, str) and path == str(tiny.warm_start_path("arithmetic"))
    assert Path(path).parent == tmp_path / "tiny" and Path(path).name.startswith("arithmetic-sft-")
    assert resolve_model_path("tiny://arithmetic-sft") == path  # the tiny:// name of the same folder
    assert tiny.warm_start("arithmetic") == path
    assert builds == [("arithmetic", 3000)]  # built once, then cached


def test_warm_start_key_follows_the_library_versions(monkeypatch):
    import transformers

    from trl_safeppo import tiny

    before = tiny.warm_start_path("arithmetic")
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert tiny.warm_start_path("arithmetic") != before  # an upgrade rebuilds the warm start


def test_warm_start_of_an_unknown_base_is_one_clear_error():
    from trl_safeppo.tiny import warm_start

    with pytest.raises(ValueError, match=r"^no warm start for 'debug': warm starts exist for arithmetic$"):
        warm_start("debug")
    accepted = r"accepted tiny models are tiny://arithmetic, tiny://debug, tiny://arithmetic-sft"
    with pytest.raises(ValueError, match=accepted):
        tiny_name("tiny://debug-sft")


def test_tiny_list_names_the_warm_start(capsys):
    from trl_safeppo.cli import main

    assert main(["tiny", "list"]) == 0
    assert "tiny://arithmetic-sft" in capsys.readouterr().out
