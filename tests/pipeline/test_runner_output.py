"""What a run prints, on a 2-stage recipe (SFT then PPO, one step each, tiny://debug): each stage's end is one line
(with its held-out scores), the PPO critic's fresh value head is one line instead of transformers' load report, and
no FutureWarning comes from this package's use of transformers' deprecated `gradient_checkpointing*` names."""

from __future__ import annotations

import re
import warnings

from trl_safeppo.pipeline.runner import run_recipe


def test_a_run_prints_each_stage_end_once_and_no_deprecation(tmp_path, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "out", "model": "tiny://debug", "output_dir": str(tmp_path / "run"),
        "reward": [{"name": "format", "weight": 0.5}, {"name": "math"}],
        "eval": {"dataset": {"path": "task://arithmetic/eval", "n": 4}, "max_new_tokens": 4},
        "stages": [
            {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 8},
             "args": {"max_steps": 1, "per_device_train_batch_size": 4}},
            {"type": "ppo", "dataset": {"path": "task://arithmetic/rl", "n": 8},
             "args": {"max_steps": 1, "per_device_train_batch_size": 2, "num_generations": 1,
                      "max_completion_length": 4}},
        ],
    }))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_recipe(str(recipe)) == 0
    deprecated = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert deprecated == []
    captured = capsys.readouterr()
    text = captured.out + captured.err
    for label in ("stage 1/2: sft (sft)", "stage 2/2: ppo (ppo)"):
        ends = [line for line in text.splitlines() if label in line and " in " in line and "started" not in line]
        assert len(ends) == 1, ends
        assert re.search(r": completed in \d+\.\ds; held-out accuracy \d\.\d{3}", ends[0]), ends[0]
    assert not re.search(r"\[trl-safeppo\] stage \d \(\w+\): completed", text)  # the runner's old second end line
    assert "LOAD REPORT" not in text and "MISSING" not in text
    assert text.count("the value head (score.weight) starts fresh") == 1
