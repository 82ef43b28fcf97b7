"""Embedded ``tiny://`` models: a real transformers architecture (Qwen2) and a byte-level BPE tokenizer with a
chat template, built locally and deterministically from a seed, and cached on disk.

Nothing is downloaded. ``tiny://arithmetic`` is the default policy of the demo recipe; ``tiny://debug`` is an even
smaller model for fast unit tests. ``tiny://arithmetic-sft`` (:func:`warm_start`) is ``tiny://arithmetic`` after a
short SFT on the embedded task, built once and cached: a policy that RL can improve in minutes. A tiny model
directory is an ordinary ``save_pretrained`` folder, so every transformers / TRL loader takes it.

The cache lives in ``$TRL_SAFEPPO_CACHE`` (default ``~/.cache/trl_safeppo``) under ``tiny/<name>-<fingerprint>``;
the fingerprint hashes the spec and the builder version, so a changed spec never reuses a stale build. Builds are
written to a temporary directory and renamed into place, so a crash never leaves a half-written model and two
processes building at once (``accelerate launch``) both end up with the same complete directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import atomic_dir

PREFIX = "tiny://"
BUILDER_VERSION = "3"  # bump whenever the build code changes what it writes: it enters the cache fingerprint

# ChatML special tokens. `<|im_end|>` ends every turn and is the EOS of generation.
BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# R1-style tags are single (non-special) tokens, so a tiny model learns the format quickly and decode keeps them.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Text the tokenizer is trained on: the words the embedded task and the chat template use, plus plain English so
# that real prompts still tokenize into sensible pieces. Digits are always split one per token (see _train_tokenizer).
_CORPUS = """
system
user
assistant
system
user
assistant
Think in <think> </think>, then answer in <answer> </answer>. Think in, then answer in.
The answer is 12. The answer is 7. What is 3 + 4? What is 5 + 6? Add 3 and 4. Add 5 and 6. Add 12 and 7.
What is 12 + 7? What is 45 - 19? Compute 3 * 8. Calculate 56 + 27. Add 14 and 9. Subtract 6 from 40.
The answer is 19. So the sum is 83. First add the tens, then add the ones. Carry the one.
plus minus times equals sum difference product total result number digit tens ones carry borrow
Please answer the question. Explain your reasoning step by step. The final answer is
Hello, how are you? I am fine, thank you. Write a short poem about the sea. I cannot help with that request.
Sorry, I can't help with that. Here is a safe alternative. This request is unsafe.
def add(a, b): return a + b  {"answer": 42, "ok": true}  [1, 2, 3]  print("hello")
the of and to in is that it for on with as was at by be this from or have an are not
""".strip()


@dataclass(frozen=True)
class TinySpec:
    """Architecture and tokenizer settings of one tiny model (all fields enter the cache fingerprint)."""

    description: str
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    vocab_size: int = 512
    seed: int = 0
    rope_theta: float = 10000.0
    extra: dict = field(default_factory=dict, compare=False, hash=False)


TINY_MODELS: dict[str, TinySpec] = {
    "arithmetic": TinySpec(
        description="0.85M-parameter Qwen2-style policy for the embedded arithmetic task (the demo's default model)",
    ),
    "debug": TinySpec(
        description="35k-parameter Qwen2-style model, for fast unit tests",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    ),
}


# Warm starts: tiny://<base>-sft is tiny://<base> after this short SFT on the embedded arithmetic task (the settings of
# tests/trainers/test_ppo_integration.py, where PPO from it raises the held-out reward). All of it enters the cache key.
WARM_STARTS: dict[str, dict] = {
    "arithmetic": {"n": 3000, "num_train_epochs": 1, "per_device_train_batch_size": 32, "learning_rate": 3e-3,
                   "seed": 0},
}
WARM_SUFFIX = "-sft"


def is_tiny(name_or_path: object) -> bool:
    """True when ``name_or_path`` is a ``tiny://`` identifier."""
    return isinstance(name_or_path, str) and name_or_path.startswith(PREFIX)


def tiny_name(identifier: str) -> str:
    """``tiny://arithmetic`` -> ``arithmetic``; raises ``ValueError`` listing the known names when unknown."""
    name = identifier[len(PREFIX) :] if is_tiny(identifier) else identifier
    if name not in TINY_MODELS and name.removesuffix(WARM_SUFFIX) not in WARM_STARTS:
        known = ", ".join([f"{PREFIX}{n}" for n in TINY_MODELS] + [f"{PREFIX}{n}{WARM_SUFFIX}" for n in WARM_STARTS])
        raise ValueError(f"unknown tiny model {identifier!r}: accepted tiny models are {known}")
    return name


def cache_root() -> Path:
    return Path(os.environ.get("TRL_SAFEPPO_CACHE", Path.home() / ".cache" / "trl_safeppo")).expanduser()


def fingerprint(name: str) -> str:
    spec = dataclasses.asdict(TINY_MODELS[name])
    spec.pop("extra", None)
    blob = json.dumps({"name": name, "builder": BUILDER_VERSION, "spec": spec, "corpus": _CORPUS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tiny_path(identifier: str) -> Path:
    """Where the tiny model lives in the cache (whether or not it is built yet)."""
    name = tiny_name(identifier)
    if name not in TINY_MODELS:
        return warm_start_path(name.removesuffix(WARM_SUFFIX))
    return cache_root() / "tiny" / f"{name}-{fingerprint(name)}"


# Weight init draws from torch's global RNG, so builds inside one process take turns (processes are kept apart by
# building into a private temporary directory and renaming it into place).
_BUILD_LOCK = threading.RLock()  # re-entrant: a warm start builds its base model while holding it


def build_tiny(identifier: str, *, force: bool = False) -> Path:
    """Build ``tiny://<name>`` (tokenizer + randomly initialised weights from the spec's seed) unless cached.

    Returns the model directory. Deterministic: the same spec and seed give bit-identical weights.
    """
    name = tiny_name(identifier)
    if name not in TINY_MODELS:
        return Path(warm_start(name.removesuffix(WARM_SUFFIX), force=force))
    target = tiny_path(name)
    if target.is_dir() and (target / "config.json").exists() and not force:
        return target
    with _BUILD_LOCK:
        if target.is_dir() and (target / "config.json").exists() and not force:
            return target  # another thread built it while this one waited
        return _build_locked(name, target, force)


def _build_locked(name: str, target: Path, force: bool) -> Path:
    # without force, a build another process finished first is kept (it is identical)
    with atomic_dir(target, replace=force) as tmp:
        _build_into(name, TINY_MODELS[name], Path(tmp))
    return target


def _train_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # Digits split one per token (arithmetic is learnable digit by digit), then byte-level BPE.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        padding_side="left",  # decoder-only generation pads on the left
    )
    fast.add_tokens(TAG_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    return fast


def _build_into(name: str, spec: TinySpec, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(spec)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=True, max_new_tokens=64
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    card = (
        f"# tiny://{name}\n\n{spec.description}.\n\nBuilt locally by `trl_safeppo.tiny` (builder {BUILDER_VERSION}, "
        f"seed {spec.seed}); {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"vocabulary {len(tokenizer)} tokens. Random weights: train it before use.\n"
    )
    (out / "README.md").write_text(card)


# ---------------------------------------------------------------------------------------------------------------
# Warm starts
def warm_start_path(name: str = "arithmetic") -> Path:
    """Where :func:`warm_start` caches ``tiny://<name>-sft``. The key hashes the base model's fingerprint, the SFT
    settings and the versions of this package, transformers, TRL and torch, so an upgrade rebuilds it."""
    if name not in WARM_STARTS:
        known = ", ".join(WARM_STARTS)
        raise ValueError(f"no warm start for {name!r}: warm starts exist for {known}")
    import torch
    import transformers
    import trl

    from . import __version__

    blob = json.dumps({"base": fingerprint(name), "sft": WARM_STARTS[name], "trl_safeppo": __version__,
                       "transformers": transformers.__version__, "trl": trl.__version__,
                       "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return cache_root() / "tiny" / f"{name}{WARM_SUFFIX}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def warm_start(name: str = "arithmetic", *, force: bool = False) -> str:
    """``tiny://<name>`` after a short SFT on the embedded arithmetic task (``tiny://<name>-sft``): a policy that
    already uses the answer format some of the time and gets some sums right, so PPO or GRPO visibly raise its
    reward in minutes. Built once (94 steps: about a minute on 2 CPU cores) and cached beside the tiny models,
    written whole or not at all (:func:`trl_safeppo.fileio.atomic_dir`); returns the model directory (a string, as
    every loader takes it).

    Call it before ``accelerate launch`` starts other processes (each process would otherwise build its own copy)."""
    target = warm_start_path(name)
    if (target / "config.json").exists() and not force:
        return str(target)
    with _BUILD_LOCK:
        if (target / "config.json").exists() and not force:
            return str(target)
        import sys

        settings = WARM_STARTS[name]
        print(f"[trl-safeppo] building {PREFIX}{name}{WARM_SUFFIX}: {PREFIX}{name} after a short SFT "
              f"({settings['n']} examples, {settings['num_train_epochs']} epoch), cached in {target}",
              file=sys.stderr, flush=True)
        _train_warm_start(name, settings, target)
    return str(target)


def _train_warm_start(name: str, settings: dict, target: Path) -> None:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from .fileio import atomic_dir
    from .tasks.arithmetic import load_arithmetic

    base = build_tiny(name)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the one line above says what is happening
    try:
        scratch_dir = tempfile.TemporaryDirectory(prefix=".warm-start-", dir=target.parent)
        with scratch_dir as scratch, atomic_dir(target) as out:
            args = SFTConfig(
                output_dir=scratch, per_device_train_batch_size=settings["per_device_train_batch_size"],
                learning_rate=settings["learning_rate"], num_train_epochs=settings["num_train_epochs"],
                seed=settings["seed"], save_strategy="no", report_to=[], disable_tqdm=True, logging_strategy="no",
                activation_checkpointing=False, bf16=False, dataloader_pin_memory=torch.cuda.is_available(),
            )
            trainer = SFTTrainer(model=str(base), args=args,
                                 train_dataset=load_arithmetic("sft", n=settings["n"], seed=settings["seed"]))
            trainer.train()
            trainer.save_model(out)
            trainer.processing_class.save_pretrained(out)
            (Path(out) / "README.md").write_text(
                f"# {PREFIX}{name}{WARM_SUFFIX}\n\n{PREFIX}{name} after SFT on the embedded arithmetic task "
                f"({json.dumps(settings)}), built by `trl_safeppo.tiny.warm_start`.\n"
            )
    finally:
        if bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------------------------
# CLI: trl-safeppo tiny {list,build,path}
def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["list", "build", "path"], help="what to do")
    parser.add_argument("name", nargs="?", default="tiny://arithmetic", help="tiny model (default tiny://arithmetic)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")


def run(args) -> int:
    if args.action == "list":
        for name, spec in TINY_MODELS.items():
            print(f"{PREFIX}{name:<16} {spec.description}")
        for name in WARM_STARTS:
            print(f"{PREFIX}{name + WARM_SUFFIX:<16} {PREFIX}{name} after a short SFT on the embedded arithmetic task "
                  "(built on first use, cached)")
        return 0
    if args.action == "path":
        print(tiny_path(args.name))
        return 0
    print(build_tiny(args.name, force=args.force))
    return 0
