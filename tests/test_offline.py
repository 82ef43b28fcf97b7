"""Offline hygiene: the whole suite runs with the Hub offline, telemetry off, and outbound connections blocked.

The guard lives in tests/conftest.py. These tests check that it really blocks (so a code path that reaches for the
network fails loudly) and that the embedded default (tiny:// model + arithmetic task) never tries.
"""

from __future__ import annotations

import os
import socket

import pytest

import conftest


def _attempts() -> int:
    return len(conftest.BLOCKED_ATTEMPTS)


def test_guard_is_installed():
    assert socket.socket.connect is conftest._guarded_connect
    assert socket.create_connection is conftest._guarded_create_connection


def test_environment_is_offline_without_telemetry():
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        assert os.environ[key] == "1", key
    assert os.environ["WANDB_MODE"] == "disabled"
    from huggingface_hub.constants import is_offline_mode

    assert is_offline_mode()


@pytest.mark.parametrize(
    "connect",
    [
        lambda: socket.create_connection(("192.0.2.1", 80), timeout=1),  # TEST-NET-1 address
        lambda: socket.create_connection(("huggingface.co", 443), timeout=1),  # blocked before any DNS lookup
        lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("198.51.100.7", 443)),
        lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).connect_ex(("2001:db8::1", 443, 0, 0)),
    ],
    ids=["create_connection-ip", "create_connection-name", "connect", "connect_ex-ipv6"],
)
def test_outbound_connection_is_blocked(connect):
    before = _attempts()
    with pytest.raises(conftest.NetworkAccessError, match="tried to open a network connection"):
        connect()
    assert _attempts() == before + 1


def test_loopback_stays_allowed():
    # torch.distributed (gloo) and accelerate talk over 127.0.0.1
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            conn, _ = server.accept()
            conn.close()


def test_embedded_default_opens_no_connection(tiny_debug_path):
    # Resolve + load a tiny model, chat-template a task prompt, generate, and ask for a Hub id that is not cached:
    # none of it may even try the network (an attempt swallowed by a library would still be counted).
    import torch

    from trl_safeppo.models import load_causal_lm, load_tokenizer, resolve_model_path
    from trl_safeppo.tasks.arithmetic import load_arithmetic

    before = _attempts()
    tok = load_tokenizer("tiny://debug")
    model = load_causal_lm(resolve_model_path("tiny://debug"))
    rows = load_arithmetic("eval", n=2)
    text = tok.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="offline"):
        load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
    assert _attempts() == before, conftest.BLOCKED_ATTEMPTS[before:]
