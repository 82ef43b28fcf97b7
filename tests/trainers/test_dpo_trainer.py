"""SafeDPOTrainer on tiny://debug: rails off == DPOTrainer, the chosen-likelihood guard is TRL's own NLL term, the
drift monitoring, a tripwire acting on beta, and a preference dataset missing its columns."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from trl_safeppo import SafeDPOConfig, SafeDPOTrainer  # noqa: E402
from trl_safeppo.trainers.tripwires import TRIPWIRES_FILE  # noqa: E402


def _pairs(n=16):
    return Dataset.from_dict(
        {
            "prompt": [f"What is {i} + 1? " for i in range(n)],
            "chosen": [f"The answer is {i + 1}." for i in range(n)],
            "rejected": [f"Maybe {i + 7} or so, I am not sure at all." for i in range(n)],
        }
    )


COMMON = dict(
    per_device_train_batch_size=4,
    max_steps=3,
    logging_steps=1,
    learning_rate=5e-3,
    beta=0.1,
    seed=0,
    report_to="none",
    use_cpu=True,
    save_strategy="no",
)


def _train(trainer_cls, config_cls, model, tmp_path, **overrides):
    args = config_cls(output_dir=str(tmp_path), **{**COMMON, **overrides})
    trainer = trainer_cls(model=model, args=args, train_dataset=_pairs())
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "entropy")


def test_rails_off_trains_exactly_like_dpo(tmp_path, tiny_debug_path):
    _, plain = _train(DPOTrainer, DPOConfig, tiny_debug_path, tmp_path / "plain")
    safe, railed = _train(SafeDPOTrainer, SafeDPOConfig, "tiny://debug", tmp_path / "safe")
    assert [{k: h[k] for k in KEYS} for h in railed] == [{k: h[k] for k in KEYS} for h in plain]
    assert plain[-1]["rewards/margins"] != 0  # the policy moved during the compared steps
    assert safe.tripwire_callback is None


def test_chosen_nll_guard_is_trls_sft_term(tmp_path, tiny_debug_path):
    _, plain = _train(
        DPOTrainer, DPOConfig, tiny_debug_path, tmp_path / "plain",
        loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
    )
    safe, guarded = _train(SafeDPOTrainer, SafeDPOConfig, tiny_debug_path, tmp_path / "safe", chosen_nll_coef=0.5)
    assert [{k: h[k] for k in KEYS} for h in guarded] == [{k: h[k] for k in KEYS} for h in plain]
    assert safe.loss_types == ["sigmoid", "sft"] and safe.loss_weights == [1.0, 0.5]
    # step 1: policy == reference, so the DPO term is -log sigmoid(0) = ln 2 = 0.6931; the NLL term adds 0.5 * NLL > 0
    assert guarded[0]["loss"] > math.log(2) + 0.1


def test_guard_keeps_the_chosen_likelihood_up(tmp_path, tiny_debug_path):
    _, plain = _train(SafeDPOTrainer, SafeDPOConfig, tiny_debug_path, tmp_path / "plain", max_steps=6)
    _, guarded = _train(
        SafeDPOTrainer, SafeDPOConfig, tiny_debug_path, tmp_path / "guarded", max_steps=6, chosen_nll_coef=1.0
    )
    # the log-ratio of the chosen completions after 6 steps: the NLL term pushes it up by a clear margin
    assert guarded[-1]["dpo/chosen_logratio"] > plain[-1]["dpo/chosen_logratio"] + 0.5


def test_drift_monitoring(tmp_path, tiny_debug_path):
    _, logs = _train(SafeDPOTrainer, SafeDPOConfig, tiny_debug_path, tmp_path)
    # step 1: policy == reference -> every log-ratio is 0
    assert logs[0]["kl"] == 0.0 and logs[0]["dpo/chosen_logratio"] == 0.0
    for h in logs:
        # margins = beta * (mean chosen log-ratio - mean rejected log-ratio), beta = 0.1
        assert h["dpo/chosen_logratio"] - h["dpo/rejected_logratio"] == pytest.approx(h["rewards/margins"] / 0.1)
        assert h["kl"] == pytest.approx(0.5 * (abs(h["dpo/chosen_logratio"]) + abs(h["dpo/rejected_logratio"])))
        assert h["beta"] == 0.1
    assert logs[-1]["kl"] > 0


def test_kl_tripwire_raises_dpo_beta(tmp_path, tiny_debug_path):
    tripwires = [{"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 1e-6, "warn_fraction": 1.0}}]
    trainer, logs = _train(SafeDPOTrainer, SafeDPOConfig, tiny_debug_path, tmp_path, tripwires=tripwires)
    with open(os.path.join(tmp_path, TRIPWIRES_FILE)) as f:
        events = [json.loads(line) for line in f]
    # step 1 has kl = 0 <= limit; steps 2 and 3 drift -> beta 0.1 -> 0.2 -> 0.4
    assert [(e["step"], e["action"], e["details"]["beta_after"]) for e in events] == [
        (2, "raise_kl", pytest.approx(0.2)),
        (3, "raise_kl", pytest.approx(0.4)),
    ]
    assert trainer.beta == pytest.approx(0.4)
    assert logs[2]["beta"] == pytest.approx(0.2)  # step 3 trained with the raised beta


def test_missing_preference_columns_names_them(tmp_path, tiny_debug_path):
    bad = Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})
    args = SafeDPOConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match=r"train_dataset is missing the column\(s\) \['chosen', 'rejected'\]"):
        SafeDPOTrainer(model=tiny_debug_path, args=args, train_dataset=bad)


def test_bad_guard_coefficient(tmp_path):
    with pytest.raises(ValueError, match="chosen_nll_coef=-1"):
        SafeDPOConfig(output_dir=str(tmp_path), use_cpu=True, chosen_nll_coef=-1)
    with pytest.raises(ValueError, match="keep one of them"):
        SafeDPOConfig(output_dir=str(tmp_path), use_cpu=True, chosen_nll_coef=1.0, loss_type=["sigmoid", "sft"])


def test_raised_beta_survives_a_checkpoint_resume(tmp_path, tiny_debug_path):
    tripwires = [{"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 1e-6, "warn_fraction": 1.0}}]
    _train(SafeDPOTrainer, SafeDPOConfig, tiny_debug_path, tmp_path, tripwires=tripwires, save_strategy="steps",
           save_steps=3)
    # steps 2 and 3 tripped: beta 0.1 -> 0.2 -> 0.4, saved in checkpoint-3
    with open(os.path.join(tmp_path, "checkpoint-3", "trl_safeppo_state.json")) as f:
        assert json.load(f)["beta"] == pytest.approx(0.4)
    args = SafeDPOConfig(output_dir=str(tmp_path), **{**COMMON, "max_steps": 4, "tripwires": []})
    resumed = SafeDPOTrainer(model=tiny_debug_path, args=args, train_dataset=_pairs())
    assert resumed.beta == 0.1
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-3"))
    step4 = [h for h in resumed.state.log_history if h.get("step") == 4 and "loss" in h][0]
    assert step4["beta"] == pytest.approx(0.4)
