"""Model identifiers: ``tiny://<name>``, local paths and Hub ids, with one clear error for bad input.

Every entry point of the project that takes a model (trainers, rejection sampling, recipes) calls
:func:`resolve_model_path` first, so ``tiny://`` works everywhere and a typo fails before anything loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .tiny import PREFIX, TINY_MODELS, build_tiny, is_tiny

# A Hub repo id: "name" or "org/name"; letters, digits, "-", "_", "."; no "--" or ".." (huggingface_hub's rules).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}$")

ACCEPTED = (
    f"accepted: tiny://<name> ({', '.join(PREFIX + n for n in TINY_MODELS)}), "
    "an existing local model directory, or a Hugging Face Hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'"
)


def looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~", "."))
        or value.count("/") > 1
        or os.sep != "/" and os.sep in value
    )


def resolve_model_path(name_or_path: str | os.PathLike, *, field: str = "model") -> str:
    """Turn a model identifier into what ``from_pretrained`` takes.

    - ``tiny://<name>``: built locally on first use, returns its cache directory.
    - an existing local directory: returned as is.
    - a path-like string that does not exist: ``ValueError`` naming ``field``, the value and what is accepted.
    - anything else must be a well-formed Hub id and is returned unchanged (transformers loads it as usual).
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"{field}={name_or_path!r} is not a model identifier; {ACCEPTED}")
    value = name_or_path.strip()
    if is_tiny(value):
        try:
            return str(build_tiny(value))
        except ValueError as err:
            raise ValueError(f"{field}={value!r}: {err}") from None
    if Path(value).expanduser().is_dir():
        path = Path(value).expanduser()
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ValueError(
                f"{field}={value!r} is a directory but holds no config.json or adapter_config.json, so it is not a "
                f"saved model; {ACCEPTED}"
            )
        return str(path)
    if looks_like_path(value) or Path(value).expanduser().exists():
        raise ValueError(f"{field}={value!r} does not exist (or is not a directory); {ACCEPTED}")
    if not _HUB_ID.match(value) or "--" in value or ".." in value:
        raise ValueError(f"{field}={value!r} is neither an existing path nor a valid Hub id; {ACCEPTED}")
    return value


def _from_pretrained(loader, name_or_path: str, field: str, kwargs: dict):
    """``loader.from_pretrained`` on a resolved identifier; a Hub id that cannot be fetched gives one clear error."""
    resolved = resolve_model_path(name_or_path, field=field)
    try:
        return loader.from_pretrained(resolved, **kwargs)
    except OSError as err:  # transformers reports a missing / unreachable repo as OSError (EnvironmentError)
        if Path(resolved).is_dir():
            raise
        from huggingface_hub.constants import is_offline_mode

        if is_offline_mode():
            why = (
                "it is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1); download it "
                "once with network access (`hf download " + resolved + "`), or pass a local directory"
            )
        else:
            why = f"it could not be loaded from the Hugging Face Hub ({str(err).splitlines()[0]})"
        raise ValueError(f"{field}={name_or_path!r}: {why}; {ACCEPTED}") from err


def load_tokenizer(name_or_path: str, *, field: str = "model", **kwargs):
    """``AutoTokenizer.from_pretrained`` on a resolved identifier (``tiny://``, a local directory or a Hub id)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, field, kwargs)


def load_causal_lm(name_or_path: str, *, field: str = "model", **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on a resolved identifier (``tiny://``, a local directory or a Hub id)."""
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, name_or_path, field, kwargs)
