"""resolve_model_path / load_*: tiny://, local directories and Hub ids; one clear error for bad input, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from trl_safeppo.models import load_causal_lm, load_tokenizer, resolve_model_path

ACCEPTED = r"accepted: tiny://<name> \(tiny://arithmetic, tiny://debug\), an existing local model directory"


def test_tiny_resolves_to_a_saved_model(tiny_debug_path):
    path = Path(tiny_debug_path)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert resolve_model_path("tiny://debug") == tiny_debug_path


def test_unknown_tiny_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"model='tiny://unknown-name'.*tiny://arithmetic, tiny://debug"):
        resolve_model_path("tiny://unknown-name")


def test_existing_directory_is_returned(tiny_debug_path, tmp_path):
    assert resolve_model_path(Path(tiny_debug_path)) == tiny_debug_path  # os.PathLike accepted
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "adapter")) == str(tmp_path / "adapter")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=rf"model='{tmp_path}' is a directory but holds no config.json.*{ACCEPTED}"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("value", ["./no/such/model", "/no/such/model", "~/no-such-model", "runs/demo/final"])
def test_missing_path_is_named(value):
    with pytest.raises(ValueError, match=rf"model='{value}' does not exist.*{ACCEPTED}"):
        resolve_model_path(value)


@pytest.mark.parametrize("value", ["bad id with spaces", "org/na--me", "-leading-dash", ""])
def test_malformed_hub_id_is_rejected(value):
    with pytest.raises(ValueError, match=ACCEPTED):
        resolve_model_path(value)


def test_field_name_appears_in_the_error():
    with pytest.raises(ValueError, match=r"^ref_model='/nope'"):
        resolve_model_path("/nope", field="ref_model")


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "HuggingFaceTB/SmolLM2-135M"])
def test_hub_id_is_returned_unchanged_without_download(hub_id):
    # Resolving a Hub id never touches the network: the session-wide guard (conftest) would raise NetworkAccessError.
    assert resolve_model_path(hub_id) == hub_id


@pytest.mark.parametrize("loader", [load_tokenizer, load_causal_lm])
def test_offline_hub_id_fails_with_a_clear_error(loader, tmp_path):
    # HF_HUB_OFFLINE=1 (conftest) and an empty cache_dir: one ValueError that names the value and the fix, raised
    # without any connection attempt (the guard would turn one into NetworkAccessError).
    with pytest.raises(ValueError, match=r"model='Qwen/Qwen2.5-0.5B-Instruct': .*offline mode is on \(HF_HUB_OFFLINE=1\)"):
        loader("Qwen/Qwen2.5-0.5B-Instruct", cache_dir=str(tmp_path / "empty-cache"))


def test_loaders_take_tiny_ids(tiny_debug_path):
    tok = load_tokenizer("tiny://debug")
    model = load_causal_lm("tiny://debug")
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
