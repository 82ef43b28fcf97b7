"""Pre-flight resolves every model a run loads (the policy, a stage's init, a PPO critic, a rejection-sampling
reward model) to something local: tiny://, a local directory, or a Hub id already in the Hugging Face cache. Offline,
a Hub id that is not cached fails here in one line naming the field, the id and how to fetch it, instead of after
the network retries of its stage. (tests/conftest.py sets HF_HUB_OFFLINE=1 and blocks the network.)"""

from __future__ import annotations

import time

import pytest

from trl_safeppo.pipeline.preflight import preflight
from trl_safeppo.pipeline.recipe import RecipeError, recipe_from_dict

FAKE = "nobody-here/no-such-model-xyz"


def recipe(model="tiny://debug", **stage_args):
    return recipe_from_dict({
        "name": "models", "model": model, "output_dir": "/tmp/unused",
        "reward": [{"name": "math"}],
        "stages": [{"type": "ppo", "dataset": {"path": "task://arithmetic/rl", "n": 4},
                    "args": {"max_steps": 1, "per_device_train_batch_size": 2, **stage_args}}],
    })


def test_an_uncached_hub_id_offline_fails_in_one_line_at_preflight():
    t0 = time.monotonic()
    with pytest.raises(RecipeError) as info:
        preflight(recipe(FAKE))
    message = str(info.value)
    assert time.monotonic() - t0 < 60  # no network retries (a generous bound; the check itself is a cache lookup)
    assert "\n" not in message
    assert message.startswith(f"model: model '{FAKE}' is a Hub id that is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in message and f"`hf download {FAKE}`" in message
    assert "HF_HUB_OFFLINE=0" in message and "local directory" in message


def test_the_critic_is_resolved_too():
    with pytest.raises(RecipeError, match=r"^stages\[0\] \(ppo\)\.args\.critic_model_path: model 'nobody-here/critic'"):
        preflight(recipe(critic_model_path="nobody-here/critic"))
    preflight(recipe(critic_model_path="reward_model"), check_hardware=False)  # a keyword, not a model


def test_a_local_path_passes(tiny_debug_path):
    plan = preflight(recipe(tiny_debug_path, critic_model_path=tiny_debug_path))
    assert plan.model == tiny_debug_path


def test_check_mode_checks_the_form_only():
    # `--check` validates a GPU recipe on another machine: a Hub id is checked for form, its presence is not required
    assert preflight(recipe(FAKE), check_hardware=False).model == FAKE


def test_a_cached_hub_model_resolves_to_its_snapshot(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    from trl_safeppo.models import require_local_model

    # the Hugging Face cache layout: models--org--name/refs/main -> a commit, snapshots/<commit>/ holds the files
    repo = tmp_path / "models--org--cached-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    assert require_local_model("org/cached-model") == str(snapshot)
    with pytest.raises(ValueError, match=r"^model='org/other' is a Hub id that is not in the local Hugging Face cache"):
        require_local_model("org/other")


def test_online_an_uncached_hub_id_is_left_to_download(monkeypatch):
    import huggingface_hub.constants as hub

    from trl_safeppo.models import require_local_model

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    assert require_local_model(FAKE) == FAKE  # local_files_only: still nothing is fetched here
