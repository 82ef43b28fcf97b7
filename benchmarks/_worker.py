"""One benchmark configuration, run in its own process: build a trainer, train `steps` steps, emit the figures.

Usage (by the harness): python -m benchmarks._worker '<json config>'
"""

from __future__ import annotations

import json
import sys
import time


def build_reward(name: str):
    """-> (reward_funcs, reward_weights or None)."""
    from trl_safeppo.rewards import resolve

    if name == "arithmetic":
        return resolve([{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.5}]), None
    if name == "length_exploit":
        from benchmarks._rewards import LengthExploitReward

        # the math rule rides along with weight 0: logged as true accuracy, never optimized
        return [LengthExploitReward(), resolve("math")], [1.0, 0.0]
    if name.startswith("reward_model:"):
        return name[len("reward_model:") :], None  # a sequence-classification model path, loaded by TRL
    raise ValueError(f"reward={name!r}: accepted are 'arithmetic', 'length_exploit', 'reward_model:<path>'")


def exact_kl(policy_logits, ref_logits, mask):
    """Mean over the masked positions of the exact KL(pi || pi_ref) of the next-token distributions, summed over the
    whole vocabulary: `sum_v pi(v) (log pi(v) - log pi_ref(v))` at each position, no token sampled.

    Args:
        policy_logits, ref_logits: `(B, T, V)` next-token logits of the policy and the reference.
        mask: `(B, T)` 1 on the positions to average over (the completion tokens).

    The per-token estimators (rails.kl: k1, k3) average one sampled token's term per position; their mean over a
    batch has the same expectation but carries the sampling spread of the tokens, and k3's is heavy-tailed (it grows
    like pi_ref / pi on a token the policy made unlikely). This one keeps only the spread over the contexts.
    """
    per_position = exact_kl_per_position(policy_logits, ref_logits)
    maskf = mask.to(per_position.dtype)
    return float((per_position * maskf).sum() / maskf.sum().clamp(min=1.0))


def exact_kl_per_position(policy_logits, ref_logits):
    """`(B, T)` exact KL(pi || pi_ref) of the next-token distributions at each position (see `exact_kl`)."""
    from trl_safeppo.rails.kl import kl_exact

    return kl_exact(policy_logits, ref_logits)


def clustered_mean_se(per_position, mask, groups) -> tuple[float, float]:
    """The token mean of `per_position` over `mask` and its standard error with the prompts as clusters.

    A batch's KL is a ratio, `R = sum_g S_g / sum_g N_g` over its prompt groups g (S_g: the group's summed KL, N_g:
    its completion tokens). The completions of one prompt are not independent draws of the policy's KL (they share
    the prompt), so the spread is taken between groups: the linearized standard error of a ratio estimator,
    `SE = sqrt(G / (G - 1) * sum_g (S_g - R N_g)^2) / sum_g N_g` (Cochran, "Sampling Techniques", 1977, section
    6.4). It is the part of a step's KL reading owed to which prompts and completions the batch happened to draw.

    Args:
        per_position: `(B, T)` values (e.g. `exact_kl_per_position`); mask: `(B, T)` 1 on counted positions;
        groups: `(B,)` integer prompt-group id of each row (GRPO: row // num_generations).
    """
    import torch

    maskf = mask.to(per_position.dtype)
    sums = torch.zeros(int(groups.max()) + 1, dtype=per_position.dtype, device=per_position.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, groups, (per_position * maskf).sum(-1))
    counts.index_add_(0, groups, maskf.sum(-1))
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    n_groups, total = len(sums), counts.sum()
    mean = sums.sum() / total
    if n_groups < 2:
        return float(mean), float("nan")
    residual = sums - mean * counts
    return float(mean), float((n_groups / (n_groups - 1) * residual.square().sum()).sqrt() / total)


def probe_kl(trainer, prompts: list, seed: int) -> tuple[float, float]:
    """The exact KL of `trainer`'s policy on a fixed probe set: one completion sampled per prompt (the trainer's
    generation settings), then `exact_kl_per_position` at every completion position up to and including EOS.
    Returns `(mean over the completion tokens, its standard error over the prompts)`.

    The sampling runs under `torch.random.fork_rng` with its own seed, so the training run's random stream, and with
    it the training, is exactly what it would be without the probe. With a few hundred prompts the standard error is
    a fraction of a training batch's: the probe reads the policy's KL, the batch reads the policy plus the luck of its
    16 prompts.
    """
    import torch
    from trl.models.utils import unwrap_model_for_generation

    tokenizer = trainer.processing_class
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    enc = {k: v.to(trainer.model.device) for k, v in enc.items()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        # generate as GRPO does (its unwrap context: gradient checkpointing off, the training generation settings).
        # Calling generate on the training-mode model with gradient checkpointing on samples completions about
        # twice as long from the same weights (measured: 62 against 32.5 tokens), which is not the policy's KL.
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, generation_kwargs=trainer.generation_kwargs,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model:
            ids = model.generate(**enc, generation_config=trainer.generation_config)
        n_prompt = enc["input_ids"].shape[1]
        completion = ids[:, n_prompt:]
        is_eos = torch.isin(completion, torch.tensor(trainer.eos_token_ids, device=ids.device))
        # 1 up to and including the first EOS (GRPO's completion mask)
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
        mask = (~after_eos).long()
        attention = torch.cat([enc["attention_mask"], mask], dim=1)
        n = completion.shape[1]

        def logits(model):
            return model(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1] / trainer.temperature

        per_position = exact_kl_per_position(logits(trainer.model), logits(trainer.ref_model))
    return clustered_mean_se(per_position, mask, torch.arange(len(ids), device=ids.device))


def with_exact_kl(trainer_cls, probe_prompts: list | None = None):
    """A subclass of the GRPO-based `trainer_cls` that also logs `kl/exact` (see `exact_kl`) for every new batch,
    measured before any update on it (the policy that sampled the batch against the reference): the benchmark's
    low-noise view of the KL the controller is steering, and `kl/exact_se`, its standard error over the batch's
    prompts (`clustered_mean_se`). Costs one policy and one reference forward per batch. With `probe_prompts`, each
    new training batch also logs `kl/probe` and `kl/probe_se`: the same policy's exact KL on those fixed prompts
    (`probe_kl`; one generation and two forwards more per batch).
    The value is this process's batch (the benchmarks run one process)."""

    class ExactKL(trainer_cls):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.ref_model is not None:
                import torch

                ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
                attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
                n = output["completion_ids"].shape[1]  # logits at positions P-1 .. P+n-2 predict the completion

                def logits(model):
                    return model(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1] / self.temperature

                with torch.no_grad():
                    per_position = exact_kl_per_position(logits(self.model), logits(self.ref_model))
                # the rows of a new batch are its prompts' completions, num_generations in a row
                mode = "train" if self.model.training else "eval"
                group = self.num_generations if mode == "train" else self.num_generations_eval
                groups = torch.arange(len(ids), device=ids.device) // group
                value, se = clustered_mean_se(per_position, output["completion_mask"], groups)
                self._metrics[mode]["kl/exact"].append(value)
                if se == se:  # NaN with one prompt per batch: nothing to log
                    self._metrics[mode]["kl/exact_se"].append(se)
                if probe_prompts and mode == "train":  # the same policy on the fixed probe prompts
                    value, se = probe_kl(self, probe_prompts, seed=self.state.global_step)
                    self._metrics[mode]["kl/probe"].append(value)
                    self._metrics[mode]["kl/probe_se"].append(se)
            return output

    ExactKL.__name__ = ExactKL.__qualname__ = f"ExactKL{trainer_cls.__name__}"
    return ExactKL


def main(config: dict) -> None:
    import tempfile

    # a fresh output directory per run (trainers write tripwire snapshots there), so concurrent runs never collide
    with tempfile.TemporaryDirectory(prefix=f"trl_safeppo_bench_{config['trainer']}_") as tmp:
        run(config, config.get("output_dir") or tmp)


def run(config: dict, output_dir: str) -> None:
    import torch

    torch.manual_seed(config.get("seed", 0))
    torch.set_num_threads(int(config.get("threads", torch.get_num_threads())))
    from benchmarks._harness import ModelTimer, emit, mark_imports_done, step_timer
    from trl_safeppo.models import resolve_model_path
    from trl_safeppo.tasks.arithmetic import RL_SIZE, load_arithmetic

    kind = config["trainer"]
    steps = int(config["steps"])
    batch = int(config.get("batch", 8))
    common = dict(
        output_dir=output_dir,
        logging_steps=1,
        max_steps=steps,
        per_device_train_batch_size=batch,
        num_generations=int(config.get("num_generations", 4)),
        max_completion_length=int(config.get("max_completion_length", 16)),
        learning_rate=float(config.get("learning_rate", 1e-5)),
        save_strategy="no",
        report_to="none",
        seed=int(config.get("seed", 0)),
        data_seed=int(config.get("seed", 0)),
        use_cpu=not torch.cuda.is_available(),
        bf16=bool(config.get("bf16", False)),
        beta=float(config.get("beta", 0.04)),
        temperature=float(config.get("temperature", 1.0)),
        disable_tqdm=True,
    )
    common.update(config.get("args", {}))  # the benchmark's own trainer settings override the defaults above
    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    elif kind == "safe_grpo":
        from trl_safeppo import SafeGRPOConfig as Config
        from trl_safeppo import SafeGRPOTrainer as Trainer

        common["rails"] = config.get("rails")
    elif kind == "safe_ppo":
        from trl_safeppo import SafePPOConfig as Config
        from trl_safeppo import SafePPOTrainer as Trainer

        common["rails"] = config.get("rails")
    else:
        raise ValueError(f"trainer={kind!r}: accepted are 'grpo', 'safe_grpo', 'safe_ppo'")

    if config.get("exact_kl"):
        probe = None
        if config.get("probe_kl"):  # fixed probe prompts, disjoint from the training prompts (the eval split)
            probe = list(load_arithmetic("eval", n=int(config["probe_kl"]))["prompt"])
        Trainer = with_exact_kl(Trainer, probe)
    import transformers.trainer  # noqa: F401  (imported by every trainer above; named so both workers match)

    mark_imports_done()
    reward_funcs, reward_weights = build_reward(config.get("reward", "arithmetic"))
    if reward_weights is not None:
        common["reward_weights"] = reward_weights
    # more prompts than the run consumes (a batch holds batch / num_generations of them), at most the whole split
    dataset = load_arithmetic("rl", n=min(batch * steps * 2, RL_SIZE), seed=int(config.get("seed", 0)))
    model = resolve_model_path(config.get("model", "tiny://debug"))
    trainer = Trainer(
        model=model,
        reward_funcs=reward_funcs,
        args=Config(**common),
        train_dataset=dataset,
    )
    timer = step_timer()
    trainer.add_callback(timer)
    model_timer = None
    snapshots: list[dict[str, float]] = []
    if config.get("profile"):
        from transformers import TrainerCallback

        model_timer = ModelTimer()
        model_timer.install(trainer)

        class Snapshot(TrainerCallback):  # cumulative model seconds by kind at each step end (drop warm-up later)
            def on_step_end(self, args, state, control, **kwargs):
                snapshots.append(dict(model_timer.by_kind))

        trainer.add_callback(Snapshot())
    profiler = None
    if config.get("cprofile"):
        import cProfile

        profiler = cProfile.Profile()
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.runcall(trainer.train)
    else:
        trainer.train()
    train_seconds = time.perf_counter() - t0
    history = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    heldout = None
    if config.get("eval_n"):  # greedy held-out accuracy of the final policy, by the math rule alone
        from trl_safeppo.monitoring.evaluation import evaluate_heldout

        heldout = evaluate_heldout(
            trainer.model, load_arithmetic("eval", n=int(config["eval_n"])), accuracy_reward="math",
            tokenizer=trainer.processing_class, max_new_tokens=int(common["max_completion_length"]),
        )
    gen_tokens = [h.get("completions/mean_length", float("nan")) * batch for h in history]
    emit(
        {
            "config": config,
            "step_seconds": timer.step_seconds,
            "train_seconds": train_seconds,
            "model_seconds": model_timer.seconds if model_timer else None,
            "model_seconds_by_kind": model_timer.by_kind if model_timer else None,
            "model_seconds_by_kind_at_step_end": snapshots,
            "generated_tokens_per_step": gen_tokens,
            "log_history": history,
            "heldout": heldout,
            "cprofile": top_functions(profiler, int(config["cprofile"])) if profiler is not None else None,
            "cprofile_ours": top_functions(profiler, int(config["cprofile"]), cumulative=True, only="trl_safeppo")
            if profiler is not None else None,
        }
    )


def top_functions(profiler, n: int, *, cumulative: bool = False, only: str | None = None) -> list[dict]:
    """The `n` functions with the most self time (cProfile `tottime`; or cumulative time), optionally only those
    whose file path contains `only`, as plain rows for the JSON result."""
    import pstats

    st = pstats.Stats(profiler)
    rows = [
        {"function": f"{path}:{line}({name})", "self_s": tt, "cumulative_s": ct, "calls": nc}
        for (path, line, name), (cc, nc, tt, ct, _) in st.stats.items()
        if only is None or only in path
    ]
    return sorted(rows, key=lambda r: r["cumulative_s" if cumulative else "self_s"], reverse=True)[:n]


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
