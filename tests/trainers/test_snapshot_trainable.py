"""Tripwire snapshots hold what training can change: trainable parameters and buffers, not frozen weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trl_safeppo.trainers.tripwires import restore_snapshot, save_snapshot


class _Accelerator:
    is_main_process = True

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def wait_for_everyone():
        return None


def _trainer(model):
    from trl_safeppo.trainers.rails_mixin import TrainerRails

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = SimpleNamespace(model=model, optimizer=optimizer, accelerator=_Accelerator(),
                              state=SimpleNamespace(global_step=7), beta=0.05, rails_wiring=TrainerRails())
    trainer.rails_wiring.start(trainer)  # no rails, no KL controller: beta is the trainer's own
    return trainer


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen base, as under LoRA
    return model


def test_snapshot_leaves_frozen_weights_out_and_restores_the_rest(tmp_path):
    model = _model()
    trainer = _trainer(model)
    path = save_snapshot(trainer, str(tmp_path))
    saved = torch.load(path, weights_only=False)["model"]
    # Linear(3, 4) frozen: its weight and bias are left out; BatchNorm's 2 parameters + 3 buffers
    # (running_mean, running_var, num_batches_tracked) and the last Linear's 2 parameters are in: 7 entries
    assert sorted(saved) == [
        "1.bias", "1.num_batches_tracked", "1.running_mean", "1.running_var", "1.weight", "2.bias", "2.weight",
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # training moves the trainable weights and the buffers
        model[2].weight.add_(1.0)
        model[1].running_mean.add_(3.0)
    assert restore_snapshot(trainer, str(tmp_path)) == 7
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_snapshot_of_another_setup_is_refused(tmp_path):
    frozen = _model()
    save_snapshot(_trainer(frozen), str(tmp_path))  # written with layer 0 frozen
    unfrozen = _model()
    unfrozen.requires_grad_(True)  # now layer 0 trains: its weights are not in the snapshot
    with pytest.raises(ValueError, match=r"trainable parameters missing \['0.weight', '0.bias'\]"):
        restore_snapshot(_trainer(unfrozen), str(tmp_path))
