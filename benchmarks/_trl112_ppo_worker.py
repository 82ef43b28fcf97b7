"""TRL 1.12's `trl.experimental.ppo.PPOTrainer` on one configuration, for benchmarks/ppo_vs_trl112.py.

Runs in a separate environment (`trl==1.12.0`, `transformers==5.17.0`; see benchmarks/setup_trl112.sh), so it
imports nothing from trl_safeppo but the dependency-free task module.
Usage: <trl112 python> -m benchmarks._trl112_ppo_worker '<json config>'
"""

from __future__ import annotations

import json
import sys
import time


def main(config: dict) -> None:
    import tempfile

    if config.get("disable_gc_collect"):
        # TRL 1.12's loop calls gc.collect() twice per rollout; a no-op here measures the rest of its loop alone
        import gc

        gc.collect = lambda *args, **kwargs: 0

    with tempfile.TemporaryDirectory(prefix="trl_safeppo_bench_trl112_") as tmp:  # never shared between runs
        run(config, tmp)


def run(config: dict, output_dir: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from benchmarks._harness import emit, mark_imports_done, step_timer
    from trl_safeppo.tasks.arithmetic import load_arithmetic

    import transformers.trainer  # noqa: F401  (as the SafePPO worker, before its baseline)

    mark_imports_done()

    torch.manual_seed(config["seed"])
    torch.set_num_threads(int(config.get("threads", torch.get_num_threads())))
    path = config["model_path"]  # a resolved tiny:// directory
    batch, rollouts, epochs = int(config["batch"]), int(config["rollouts"]), int(config["ppo_epochs"])
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    prompts = load_arithmetic("rl", n=batch * rollouts * 2, seed=config["seed"])["prompt"]
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
    # transformers 5 returns a BatchEncoding (a mapping, not a dict) from a tokenizing chat template
    ids = [list(x) if isinstance(x, list) else list(x["input_ids"]) for x in ids]
    dataset = Dataset.from_dict({"input_ids": ids})

    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    args = PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=epochs,
        total_episodes=batch * rollouts,
        response_length=int(config["max_completion_length"]),
        stop_token="eos",
        temperature=1.0,
        learning_rate=1e-5,
        kl_coef=0.05,
        local_rollout_forward_batch_size=batch,
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,  # as the SafePPO worker: the same PrinterCallback, no progress bar
        seed=config["seed"],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
    )
    timer = step_timer()  # TRL 1.12's loop calls on_step_end once per rollout (after its num_ppo_epochs updates)
    trainer.add_callback(timer)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    emit({"config": config, "train_seconds": train_seconds, "rollouts": rollouts,
          "rollout_seconds": timer.step_seconds, "step_seconds": timer.step_seconds})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
