"""The TRL (and transformers) surfaces trl_safeppo's trainers rely on, pinned in one place.

The trainers extend TRL's stable trainers through `super()` and post-process what they return. That is only safe
while the hooks they override keep their names, signatures, call order and output keys. When a TRL upgrade changes
one of them, a test here fails with a message naming the surface and the trainer code that depends on it, instead of
a silent drift or a crash deep in a training step. Cheap: signatures and source text only, no model is built.
"""

from __future__ import annotations

import inspect

import pytest

trl = pytest.importorskip("trl")
from transformers import Trainer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def source(obj) -> str:
    return inspect.getsource(obj)


def require(condition: bool, surface: str, used_by: str) -> None:
    assert condition, (
        f"The installed TRL/transformers changed {surface}. {used_by} depends on it: update that code for the new "
        f"behaviour (and this contract), or pin TRL to the supported range in pyproject.toml."
    )


# --------------------------------------------------------------------------------------------------- SafePPOTrainer
PPO = "trl_safeppo/trainers/ppo_trainer.py (SafePPOTrainer)"


@pytest.mark.parametrize(
    "method, expected",
    [
        ("_generate_and_score_completions", ["self", "inputs"]),
        ("_calculate_rewards", ["self", "inputs", "prompts", "completions", "completion_ids_list"]),
        ("_compute_loss", ["self", "model", "inputs"]),
        ("training_step", ["self", "model", "inputs", "num_items_in_batch"]),
        ("_save_checkpoint", ["self", "model", "trial"]),
        ("_load_optimizer_and_scheduler", ["self", "checkpoint"]),
    ],
)
def test_grpo_hook_signatures(method, expected):
    func = getattr(GRPOTrainer, method, None)
    require(func is not None, f"GRPOTrainer.{method} (removed)", PPO)
    require(params(func) == expected, f"GRPOTrainer.{method} signature {params(func)} (expected {expected})", PPO)


def test_per_token_logps_helper():
    func = GRPOTrainer._get_per_token_logps_and_entropies
    names = params(func)
    require(
        names[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"] and "batch_size" in names,
        f"GRPOTrainer._get_per_token_logps_and_entropies signature {names}",
        PPO + " (rollout-time policy log-probs, capture of the loss's log-probs)",
    )
    src = source(func)
    require("return logps, entropies, aux_loss" in src, "the 3-tuple returned by _get_per_token_logps_and_entropies", PPO)


def test_trainer_init_accepts_grpo_arguments():
    names = params(GRPOTrainer.__init__)
    for name in ["model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
                 "reward_processing_classes", "callbacks", "optimizers", "peft_config"]:
        require(name in names, f"GRPOTrainer.__init__ argument {name!r}", PPO)


def test_rollout_output_keys():
    src = source(GRPOTrainer._generate_and_score_completions)
    for key in ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch",
                "old_per_token_logps", "ref_per_token_logps", "tool_mask"]:
        require(f'"{key}"' in src, f"the output key {key!r} of GRPOTrainer._generate_and_score_completions", PPO)
    require(
        "rewards_per_func = self._calculate_rewards(" in src,
        "where GRPOTrainer._generate_and_score_completions gets its (gathered) rewards",
        PPO + " (reads the rewards from _calculate_rewards)",
    )
    require(
        "if self.beta != 0.0:" in src and "ref_per_token_logps" in src,
        "the reference log-probs being computed whenever beta != 0",
        PPO + " (KL penalty in the reward needs them)",
    )
    require(
        "process_slice = slice(" in src and "self.accelerator.process_index * len(prompts)" in src,
        "the per-process slicing of the gathered batch (contiguous rows per rank)",
        PPO + " (gathers per-token tensors and keeps rank * n_local ... (rank + 1) * n_local)",
    )


def test_loss_accepts_per_token_advantages_and_reads_beta():
    src = source(GRPOTrainer._compute_loss)
    require("if advantages.dim() == 1:" in src, "(B, T) advantages support in GRPOTrainer._compute_loss", PPO)
    require(
        'inputs.get("old_per_token_logps")' in src and "per_token_logps.detach() if old_per_token_logps is None" in src,
        "the old log-probs fallback in GRPOTrainer._compute_loss",
        PPO,
    )
    require(
        "if self.beta != 0.0:" in src and "per_token_loss + self.beta * per_token_kl" in src,
        "the KL term of GRPOTrainer._compute_loss being gated by self.beta",
        PPO + " (sets beta to 0 around super()._compute_loss so the KL stays out of the loss)",
    )
    require(
        "self._get_per_token_logps_and_entropies(" in src,
        "GRPOTrainer._compute_loss computing the policy log-probs through _get_per_token_logps_and_entropies",
        PPO + " (captures them for approx KL / clip fraction)",
    )


def test_reference_model_only_when_beta_nonzero():
    src = source(GRPOTrainer.__init__)
    require("if self.beta == 0.0:" in src and "self.ref_model = None" in src, "reference model creation", PPO)
    for attr in ["self.reward_weights", "self.eos_token_ids", "self.num_generations", "self.epsilon_low",
                 "self.epsilon_high", "self.num_iterations", "self._metrics", "self._tokenizer", "self.reward_func_names",
                 "self._is_vlm"]:
        require(attr in src, f"the GRPOTrainer attribute {attr}", PPO)


def test_generation_batch_is_shuffled_and_split_along_dim0():
    src = source(GRPOTrainer._prepare_inputs)
    require(
        "shuffle_sequence_dict(generation_batch)" in src and "split_tensor_dict(" in src,
        "GRPOTrainer._prepare_inputs shuffling and splitting every tensor of the rollout along dim 0",
        PPO + " (its (B, T) advantages / values / returns ride along with the batch)",
    )


def test_grpo_config_min_generations_error_is_last_batch_check():
    from trl_safeppo.trainers.ppo_config import GRPO_MIN_GENERATIONS_MESSAGE

    src = source(GRPOConfig.__post_init__)
    require(GRPO_MIN_GENERATIONS_MESSAGE in src, "GRPOConfig's num_generations < 2 error message", "ppo_config.py")
    tail = src[src.index(GRPO_MIN_GENERATIONS_MESSAGE):]
    checked = {"self.generation_batch_size =", "self.steps_per_generation =", "num_generations_eval"}
    require(
        not any(c in tail for c in checked) and "vllm_importance_sampling" in tail,
        "the checks that follow GRPOConfig's num_generations < 2 error (only vLLM IS checks may follow)",
        "trl_safeppo/trainers/ppo_config.py (SafePPOConfig re-runs those when num_generations == 1)",
    )


def test_helpers_imported_from_trl():
    from trl.models.utils import disable_gradient_checkpointing  # noqa: F401
    from trl.trainer.utils import disable_dropout_in_model, shuffle_sequence_dict, split_tensor_dict  # noqa: F401


def test_rollout_buffer_indexing():
    src = source(GRPOTrainer._prepare_inputs)
    require(
        "self._buffered_inputs[self._step % self.args.steps_per_generation]" in src
        and "generate_every = self.args.steps_per_generation * self.num_iterations" in src,
        "how GRPOTrainer._prepare_inputs buffers a rollout and serves its slices",
        PPO + " (_prepare_inputs re-splits the buffered slices at every later PPO epoch)",
    )


def test_trainer_loop_order():
    src = source(Trainer._prepare_for_training)
    require(
        src.index("self.create_scheduler(") < src.index("self._load_optimizer_and_scheduler(resume_from_checkpoint)"),
        "Trainer._prepare_for_training order (create_scheduler before _load_optimizer_and_scheduler)",
        PPO + " (creates the critic scheduler in create_scheduler, restores it in _load_optimizer_and_scheduler)",
    )
    loop = source(Trainer._inner_training_loop) if "_set_sync_gradients" in source(Trainer._inner_training_loop) else ""
    if not loop:
        loop = inspect.getsource(inspect.getmodule(Trainer))
    require(
        "self.accelerator.gradient_state._set_sync_gradients(do_sync_step)" in loop,
        "Trainer setting accelerator.sync_gradients before each training_step",
        PPO + " (steps the critic optimizer when sync_gradients is True)",
    )
    require(
        params(Trainer.create_scheduler)[:3] == ["self", "num_training_steps", "optimizer"],
        "Trainer.create_scheduler signature",
        PPO,
    )


# ------------------------------------------------------------------ shared rails wiring, SafeGRPO, SafeDPO, tripwires
WIRING = "trl_safeppo/trainers/_wiring.py (RailsWiring / SafeRailsMixin, used by SafeGRPO and SafePPO)"
DPO = "trl_safeppo/trainers/dpo_trainer.py (SafeDPOTrainer)"
TRIPWIRES = "trl_safeppo/trainers/tripwires.py (TripwireCallback)"


def test_rewards_are_gathered_then_summed_with_weights_and_all_nan_rows_unscorable():
    require(
        "rewards_per_func = gather(rewards_per_func)" in source(GRPOTrainer._calculate_rewards),
        "GRPOTrainer._calculate_rewards returning the rewards gathered over all processes",
        WIRING + " (rails run on the global batch; lengths are gathered to match)",
    )
    src = source(GRPOTrainer._generate_and_score_completions)
    require(
        "rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)" in src
        and "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)" in src,
        "the weighted nansum of rewards_per_func and the all-NaN 'unscorable' rows",
        WIRING + " (the rails_adjustment column carries railed - raw through that sum)",
    )
    require(
        "ids[-1] not in eos_and_pad" in src,
        "GRPO's truncation test (last token not EOS / pad)",
        WIRING + " (RewardBatch.truncated uses the same definition)",
    )


def test_grpo_attributes_read_by_the_wiring():
    src = source(GRPOTrainer.__init__)
    for attr in ["self._tokenizer", "self.num_generations_eval", "self.max_completion_length",
                 "self._buffered_inputs", "self.reward_func_names"]:
        require(attr in src, f"the GRPOTrainer attribute {attr}", WIRING)
    require(
        'self._metrics[mode]["kl"].append(' in source(GRPOTrainer._compute_loss),
        "GRPO logging its per-token KL as `kl` from _compute_loss",
        WIRING + " (the adaptive KL controller reads it after each training_step)",
    )


def test_what_one_draw_adds_to_the_trainer():
    used_by = WIRING + " (rails.kl.pull_back_on='new_batch': _DrawState undoes a discarded draw)"
    init = source(GRPOTrainer.__init__)
    for attr in ["self._logs = {", "self._pending_extra_logs = defaultdict(list)",
                 "self._pending_metrics = defaultdict(list)", "self._last_loaded_step = -1"]:
        require(attr in init, f"the GRPOTrainer attribute `{attr}`", used_by)
    draw = source(GRPOTrainer._generate) + source(GRPOTrainer._generate_and_score_completions)
    require(
        "self.state.num_input_tokens_seen +=" in draw and 'self._logs["completion"].extend(' in draw,
        "GRPO's generation counting tokens in state.num_input_tokens_seen and filling self._logs",
        used_by,
    )
    require(
        "self.state.global_step != self._last_loaded_step" in source(GRPOTrainer._generate_single_turn),
        "vLLM weight sync keyed on self._last_loaded_step",
        used_by + " (it resets _last_loaded_step so vLLM loads the pulled-back weights before the redraw)",
    )


def test_optimizer_step_is_bracketed_by_callbacks_and_batches_come_from_prepare_inputs():
    loop = inspect.getsource(inspect.getmodule(Trainer))
    pre, step, post = (
        "self.callback_handler.on_pre_optimizer_step(", "self.optimizer.step()", "self.callback_handler.on_optimizer_step("
    )
    require(
        pre in loop and step in loop and post in loop and loop.index(pre) < loop.index(step) < loop.index(post),
        "the Trainer loop calling on_pre_optimizer_step, optimizer.step(), on_optimizer_step in that order",
        WIRING + " (rails.kl.max_kl: KLTrustRegion copies the weights before the step and scales it back after)",
    )
    require(
        params(GRPOTrainer._prepare_inputs) == ["self", "generation_batch"]
        and "inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]"
        in source(GRPOTrainer._prepare_inputs),
        "GRPOTrainer._prepare_inputs returning the micro-batch each training_step trains on",
        WIRING + " (rails.kl.max_kl collects the micro-batches of each optimizer step there)",
    )


def test_trainer_logs_before_callbacks_and_has_output_dir_helper():
    src = source(Trainer.log)
    require(
        src.index("self.state.log_history.append(output)") < src.index("self.callback_handler.on_log("),
        "Trainer.log appending to log_history before calling on_log",
        TRIPWIRES + " (adds tripwire/<detector> to the record just logged)",
    )
    require(params(Trainer._get_output_dir) == ["self", "trial"], "Trainer._get_output_dir signature", WIRING)
    import dataclasses

    from transformers import TrainingArguments

    require(
        "logging_nan_inf_filter" in {f.name for f in dataclasses.fields(TrainingArguments)},
        "TrainingArguments.logging_nan_inf_filter",
        "grpo_config.py / dpo_config.py (default False so non_finite sees NaN losses)",
    )


def test_dpo_surfaces():
    from trl import DPOTrainer

    require(
        params(DPOTrainer.compute_loss) == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
        f"DPOTrainer.compute_loss signature {params(DPOTrainer.compute_loss)}",
        DPO,
    )
    for method in ("_save_checkpoint", "_load_optimizer_and_scheduler"):
        require(hasattr(DPOTrainer, method), f"DPOTrainer.{method}", DPO + " (beta in checkpoints)")
    src = source(DPOTrainer._compute_loss)
    require(
        "chosen_rewards = self.beta * chosen_logratios.detach()" in src
        and 'self._metrics[mode]["rewards/chosen"].append(' in src
        and 'self._metrics[mode]["rewards/rejected"].append(' in src,
        "DPOTrainer logging rewards/chosen and rewards/rejected as beta * mean log-ratio",
        DPO + " (dpo/chosen_logratio, dpo/rejected_logratio and kl are derived from them)",
    )
    require(
        'elif loss_type == "sft":' in src and "self.loss_weights" in src,
        "DPOTrainer's `sft` loss type and loss_weights",
        DPO + " (the chosen-likelihood guard is TRL's sft term)",
    )
    init = source(DPOTrainer.__init__)
    require(
        "self.beta = args.beta" in init and "self.loss_types = args.loss_type" in init,
        "DPOTrainer reading beta and loss_type from args at __init__",
        DPO + " (configures the guard on a copy of args; raise_kl sets self.beta)",
    )


def test_trainer_helpers_used_by_ppo():
    from transformers import TrainingArguments

    for name in ["_get_output_dir", "create_scheduler", "_prepare_for_training"]:
        require(hasattr(Trainer, name), f"transformers.Trainer.{name}", PPO + " (critic checkpoint / scheduler)")
    require(hasattr(TrainingArguments, "get_warmup_steps"), "TrainingArguments.get_warmup_steps", PPO)
    require(
        params(Trainer.get_optimizer_cls_and_kwargs) == ["args", "model"]
        and params(Trainer.get_decay_parameter_names) == ["self", "model"],
        "Trainer.get_optimizer_cls_and_kwargs(args, model) / get_decay_parameter_names(model)",
        PPO + " (builds the critic's optimizer as the Trainer builds the policy's)",
    )
    require(
        "self.current_gradient_accumulation_steps" in source(GRPOTrainer._compute_loss),
        "GRPOTrainer._compute_loss scaling by current_gradient_accumulation_steps",
        PPO + " (scales the value loss the same way)",
    )

