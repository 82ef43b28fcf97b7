"""SFT warm start of tiny://arithmetic on the embedded task's sft split (for the reward-hacking benchmark).

Usage: python -m benchmarks._sft_worker '{"model": "tiny://arithmetic", "output_dir": "...", "seed": 0}'
The checkpoint is written to a temporary directory and renamed into place, so a killed run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys


def main(config: dict) -> None:
    from trl import SFTConfig, SFTTrainer

    from benchmarks._harness import emit
    from trl_safeppo.models import resolve_model_path
    from trl_safeppo.tasks.arithmetic import DEMO_SETTINGS, load_arithmetic

    out = config["output_dir"]
    if not os.path.exists(os.path.join(out, "config.json")):
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        data = load_arithmetic("sft", n=int(DEMO_SETTINGS["sft_num_examples"]), seed=config.get("seed", 0))
        trainer = SFTTrainer(
            model=resolve_model_path(config.get("model", "tiny://arithmetic")),
            train_dataset=data,
            args=SFTConfig(
                output_dir=tmp,
                learning_rate=float(DEMO_SETTINGS["sft_learning_rate"]),
                num_train_epochs=float(config.get("epochs", DEMO_SETTINGS["sft_num_train_epochs"])),
                per_device_train_batch_size=int(DEMO_SETTINGS["sft_per_device_train_batch_size"]),
                save_strategy="no",
                report_to="none",
                logging_steps=10,
                seed=config.get("seed", 0),
                use_cpu=True,
                disable_tqdm=True,
            ),
        )
        trainer.train()
        trainer.save_model(tmp)
        trainer.processing_class.save_pretrained(tmp)
        os.replace(tmp, out)
    emit({"config": config, "path": out, "step_seconds": []})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
