"""SFT warm start of tiny://arithmetic on the embedded task's sft split with the demo recipe's settings
(`DEMO_SETTINGS`), for the reward-hacking and KL-control benchmarks.

Usage: python -m benchmarks._sft_worker '{"model": "tiny://arithmetic", "output_dir": "...", "seed": 0}'
The checkpoint is written to a temporary directory and renamed into place, so a killed run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import sys


def main(config: dict) -> None:
    from trl import SFTConfig, SFTTrainer

    from benchmarks._harness import emit
    from trl_safeppo.models import resolve_model_path
    from trl_safeppo.tasks.arithmetic import load_arithmetic

    out = config["output_dir"]
    if not os.path.exists(os.path.join(out, "config.json")):
        from trl_safeppo.fileio import atomic_dir

        with atomic_dir(out) as tmp:
            data = load_arithmetic("sft", n=sft_settings(config)["num_examples"], seed=config.get("seed", 0))
            settings = sft_settings(config)
            trainer = SFTTrainer(
                model=resolve_model_path(config.get("model", "tiny://arithmetic")),
                train_dataset=data,
                args=SFTConfig(
                    output_dir=tmp,
                    learning_rate=settings["learning_rate"],
                    lr_scheduler_type=settings["lr_scheduler_type"],
                    lr_scheduler_kwargs=settings["lr_scheduler_kwargs"],
                    activation_checkpointing=False,  # as the demo recipe: a tiny model needs no recomputation
                    warmup_steps=settings["warmup_steps"],
                    num_train_epochs=settings["num_train_epochs"],
                    per_device_train_batch_size=settings["per_device_train_batch_size"],
                    save_strategy="no",
                    report_to="none",
                    logging_steps=10,
                    seed=config.get("seed", 0),
                    use_cpu=settings["use_cpu"],
                    bf16=settings["bf16"],
                    disable_tqdm=True,
                ),
            )
            trainer.train()
            trainer.save_model(tmp)
            trainer.processing_class.save_pretrained(tmp)
    emit({"config": config, "path": out, "step_seconds": []})


def sft_settings(config: dict | None = None) -> dict:
    """The demo recipe's SFT settings (`DEMO_SETTINGS` of the embedded task), `config["epochs"]` overriding.

    bf16 only on a GPU, as the recipe runner does (`pipeline.preflight`): TRL's SFTConfig defaults to bf16 autocast,
    which on a CPU without bf16 instructions runs every matmul through a scalar fallback (measured on a 2-core AMD
    EPYC: about 4 s per step instead of about 0.2 s) and makes the warm start depend on the CPU's bf16 support."""
    import torch

    from trl_safeppo.tasks.arithmetic import DEMO_SETTINGS as D

    cuda = torch.cuda.is_available()
    return {
        "use_cpu": not cuda,
        "bf16": cuda,
        "learning_rate": float(D["sft_learning_rate"]),
        "lr_scheduler_type": str(D.get("sft_lr_scheduler_type", "linear")),
        "lr_scheduler_kwargs": dict(D.get("sft_lr_scheduler_kwargs", {})),
        "warmup_steps": D.get("sft_warmup_steps", 0),
        "num_train_epochs": float((config or {}).get("epochs", D["sft_num_train_epochs"])),
        "per_device_train_batch_size": int(D["sft_per_device_train_batch_size"]),
        "num_examples": int(D["sft_num_examples"]),
    }


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
