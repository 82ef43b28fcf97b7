"""Model identifiers: ``tiny://<name>``, local paths and Hub ids, with one clear error for bad input.

Every entry point of the project that takes a model (trainers, rejection sampling, recipes) calls
:func:`resolve_model_path` first, so ``tiny://`` works everywhere and a typo fails before anything loads.
"""

from __future__ import annotations

import contextlib
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


def fetch_hint(repo_id: str) -> str:
    """How to put a Hub model in the local cache, or run without it: one clause, for error messages."""
    return (f"download it once with network access (`hf download {repo_id}`, or `huggingface-cli download {repo_id}` "
            "with an older huggingface_hub), or set HF_HUB_OFFLINE=0 so that the run downloads it, or pass a local "
            "directory")


def cached_hub_model(repo_id: str) -> str | None:
    """The local directory of a Hub model in the Hugging Face cache (``snapshot_download(local_files_only=True)``),
    or None when it is not cached. Nothing is downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is a FileNotFoundError; a malformed id a ValueError
        return None


def require_local_model(name_or_path: str, *, field: str = "model") -> str:
    """:func:`resolve_model_path`, then, for a Hub id in offline mode (``HF_HUB_OFFLINE=1``), its directory in the local
    cache: a model that is not there is one ``ValueError`` naming ``field``, the id and how to fetch it, instead of
    a load that retries the network and fails later. Online, a Hub id that is not cached is returned as is (it is
    downloaded when it is first loaded)."""
    resolved = resolve_model_path(name_or_path, field=field)
    if Path(resolved).is_dir():
        return resolved
    local = cached_hub_model(resolved)
    if local is not None:
        return local
    from huggingface_hub.constants import HF_HUB_CACHE, is_offline_mode

    if is_offline_mode():
        raise ValueError(f"{field}={resolved!r} is a Hub id that is not in the local Hugging Face cache "
                         f"({HF_HUB_CACHE}) and offline mode is on (HF_HUB_OFFLINE=1); {fetch_hint(resolved)}")
    return resolved


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
            why = ("it is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1); "
                   + fetch_hint(resolved))
        else:
            why = f"it could not be loaded from the Hugging Face Hub ({str(err).splitlines()[0]})"
        raise ValueError(f"{field}={name_or_path!r}: {why}; {ACCEPTED}") from err


def quiet_trl_checkpointing_aliases() -> None:
    """TRL 1.16's own GRPOTrainer and DPOTrainer switch activation checkpointing around generation with
    ``trl.models.utils.disable_gradient_checkpointing``, which calls transformers' deprecated
    ``gradient_checkpointing*`` aliases: a FutureWarning at every rollout since transformers 5.23, even with
    checkpointing off, and nothing a user can change. This package itself uses the current names
    (:func:`activation_checkpointing_off`); the trainers and the runner hide exactly those three alias warnings
    (whoever calls the aliases); every other warning keeps its default."""
    import warnings

    aliases = r"`(is_gradient_checkpointing|gradient_checkpointing_(enable|disable))` is deprecated"
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers.modeling_utils", message=aliases)


@contextlib.contextmanager
def activation_checkpointing_off(model, checkpointing_kwargs: dict | None = None):
    """Turn a model's activation checkpointing off for a forward without gradient, and back on afterwards: TRL's
    ``disable_gradient_checkpointing`` on transformers' current names (``is_activation_checkpointing``,
    ``activation_checkpointing_disable`` / ``_enable``; the ``gradient_checkpointing*`` ones warn since 5.23).
    ``every_n_layers`` and ``offload`` in ``checkpointing_kwargs`` are arguments of the enable call."""
    if not hasattr(model, "is_activation_checkpointing"):  # transformers < 5.23: the old names are the API
        from trl.models.utils import disable_gradient_checkpointing

        with disable_gradient_checkpointing(model, checkpointing_kwargs):
            yield
        return
    enabled = model.is_activation_checkpointing
    if enabled:
        model.activation_checkpointing_disable()
    try:
        yield
    finally:
        if enabled:
            enable_activation_checkpointing(model, checkpointing_kwargs)


def enable_activation_checkpointing(model, checkpointing_kwargs: dict | None = None) -> None:
    """Turn a model's activation recomputation on as the transformers Trainer does: ``every_n_layers`` and
    ``offload`` are arguments of the enable call (transformers >= 5.23), the other keys go to torch's checkpoint."""
    kwargs = dict(checkpointing_kwargs or {})
    if not hasattr(model, "activation_checkpointing_enable"):  # transformers < 5.23: the old name is the API
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
        return
    layer_args = {k: kwargs.pop(k) for k in ("every_n_layers", "offload") if k in kwargs}
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None, **layer_args)


def load_value_model(path: str, *, what: str = "critic", **kwargs):
    """``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` for a PPO critic.

    A causal-LM checkpoint has no value head, so the head starts fresh: that is said in one line (on the main
    process) instead of transformers' load report, whose red ``score.weight | MISSING`` reads like an error. The report
    is kept whenever anything else is missing, unexpected (other than the LM head the critic drops) or mismatched.
    """
    import logging
    import sys

    from transformers import AutoModelForSequenceClassification

    held: list[logging.LogRecord] = []

    class HoldLoadReport(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "LOAD REPORT" in str(record.msg):
                held.append(record)
                return False
            return True

    log = logging.getLogger("transformers.modeling_utils")
    hold = HoldLoadReport()
    log.addFilter(hold)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, output_loading_info=True, **kwargs
        )
    finally:
        log.removeFilter(hold)
    trunk = getattr(model, "base_model_prefix", "") + "."
    head = {name for name, _ in model.named_parameters() if not name.startswith(trunk)}
    missing, mismatched = set(info.get("missing_keys") or ()), list(info.get("mismatched_keys") or ())
    unexpected = {k for k in info.get("unexpected_keys") or () if not k.startswith("lm_head.")}
    if missing and missing <= head and not unexpected and not mismatched:
        if os.environ.get("RANK", "0") == "0":
            print(f"[trl-safeppo] {what}: the value head ({', '.join(sorted(missing))}) starts fresh: {path} has none "
                  "(a causal LM); the trunk is loaded from it", file=sys.stderr, flush=True)
    else:
        for record in held:
            log.handle(record)
    return model


def load_tokenizer(name_or_path: str, *, field: str = "model", **kwargs):
    """``AutoTokenizer.from_pretrained`` on a resolved identifier (``tiny://``, a local directory or a Hub id)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, field, kwargs)


def load_causal_lm(name_or_path: str, *, field: str = "model", **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on a resolved identifier (``tiny://``, a local directory or a Hub id)."""
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, name_or_path, field, kwargs)
