"""The TRL (and transformers) surface trl_safeppo's trainers rely on, checked by behaviour.

The trainers extend TRL's stable trainers through `super()` and post-process what they return, so they depend on the
hooks they override keeping their signatures, their call order and the types and shapes of what they return. Each
check here calls that surface on plain TRL objects (signatures through `inspect`; the hooks themselves on
tiny://debug, one short training run recorded by a plain GRPOTrainer subclass), and fails with a message naming the
TRL surface that changed and the package code that depends on it. The private members are the list of
`trl_safeppo/trainers/_trl_surface.py`.
"""

from __future__ import annotations

import inspect

import pytest

trl = pytest.importorskip("trl")
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from trl import DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: E402

from trl_safeppo.trainers._trl_surface import PRIVATE_MEMBERS  # noqa: E402

PPO = "trainers/ppo_trainer.py (SafePPOTrainer)"
MIXIN = "trainers/rails_mixin.py (SafeRailsMixin, used by SafeGRPOTrainer and SafePPOTrainer)"
REWARDS = "trainers/reward_rails.py (RewardStage)"
KL = "trainers/kl_control.py (KLControl)"
TRIPWIRES = "trainers/tripwires.py (TripwireCallback, snapshots)"
DPO = "trainers/dpo_trainer.py (SafeDPOTrainer)"


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def require(condition: bool, surface: str, used_by: str) -> None:
    assert condition, (
        f"The installed TRL/transformers changed {surface}. {used_by} depends on it: update that code for the new "
        f"behaviour (and this contract), or pin TRL to the supported range in pyproject.toml."
    )


# ------------------------------------------------------------------------------------------------- signatures
@pytest.mark.parametrize(
    ("owner", "method", "expected", "used_by"),
    [
        (GRPOTrainer, "_calculate_rewards", ["self", "inputs", "prompts", "completions", "completion_ids_list"],
         MIXIN),
        (GRPOTrainer, "_generate_and_score_completions", ["self", "inputs"], MIXIN + " and " + PPO),
        (GRPOTrainer, "_prepare_inputs", ["self", "generation_batch"], PPO),
        (GRPOTrainer, "compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"], PPO),
        (GRPOTrainer, "training_step", ["self", "model", "inputs", "num_items_in_batch"], MIXIN + " and " + PPO),
        (Trainer, "train", ["self", "resume_from_checkpoint", "trial", "ignore_keys_for_eval"], MIXIN + " and " + DPO),
        (Trainer, "create_scheduler", ["self", "num_training_steps", "optimizer"], PPO),
        (Trainer, "get_decay_parameter_names", ["self", "model"], PPO + " (the critic's optimizer)"),
        (Trainer, "get_optimizer_cls_and_kwargs", ["args", "model"], PPO + " (the critic's optimizer)"),
        (DPOTrainer, "compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"], DPO),
    ],
)
def test_hook_signatures(owner, method, expected, used_by):
    func = getattr(owner, method, None)
    require(func is not None, f"{owner.__name__}.{method} (removed)", used_by)
    got = params(func)[: len(expected)]
    require(got == expected, f"{owner.__name__}.{method} signature {params(func)} (expected {expected} first)", used_by)


def test_per_token_logps_helper_signature():
    names = params(GRPOTrainer._get_per_token_logps_and_entropies)
    require(
        names[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"] and "batch_size" in names,
        f"GRPOTrainer._get_per_token_logps_and_entropies signature {names}",
        PPO + " and " + KL,
    )


def test_callback_events_used():
    for event in ("on_save", "on_step_end", "on_log", "on_train_begin"):
        require(callable(getattr(TrainerCallback, event, None)), f"TrainerCallback.{event}", MIXIN)
    require(callable(getattr(TrainingArguments, "get_warmup_steps", None)), "TrainingArguments.get_warmup_steps", PPO)


def test_private_members_listed_exist():
    for name in PRIVATE_MEMBERS:
        owners = [c for c in (GRPOTrainer, DPOTrainer, Trainer) if hasattr(c, name)]
        if not owners:  # state: assigned in __init__, checked on a live trainer below
            continue
        require(callable(getattr(owners[0], name)), f"{owners[0].__name__}.{name} (no longer a method)", "trainers/")


@pytest.mark.parametrize(
    "sizes",
    [dict(per_device_train_batch_size=2, gradient_accumulation_steps=3),
     dict(per_device_train_batch_size=3, generation_batch_size=9),
     dict(per_device_train_batch_size=1, steps_per_generation=5)],
)
def test_grpo_config_derives_ppo_batches_with_one_generation(sizes):
    # SafePPOConfig runs GRPOConfig's checks for num_generations=1 on the batch doubled with 2 completions per
    # prompt: the derived sizes must be those of GRPOConfig's own arithmetic (2 x 3 = 6 rows in 3 steps; 9 rows of 3
    # in 3 steps; 1 x 5 = 5 rows in 5 steps), odd sizes included
    from trl_safeppo import SafePPOConfig

    common = dict(output_dir="unused", use_cpu=True, report_to="none")
    ppo = SafePPOConfig(num_generations=1, **common, **sizes)
    expected = {"per_device_train_batch_size": 2, "generation_batch_size": 6, "steps_per_generation": 3} \
        if "gradient_accumulation_steps" in sizes else \
        {"per_device_train_batch_size": 3, "generation_batch_size": 9, "steps_per_generation": 3} \
        if "generation_batch_size" in sizes else \
        {"per_device_train_batch_size": 1, "generation_batch_size": 5, "steps_per_generation": 5}
    got = {k: getattr(ppo, k) for k in expected}
    require(got == expected and ppo.num_generations == 1,
            f"GRPOConfig's batch-size derivation (num_generations=1 via the doubled batch: {got}, expected "
            f"{expected})", "trainers/ppo_config.py (SafePPOConfig._grpo_post_init_with_one_generation)")


def test_grpo_config_checks_still_run_with_one_generation():
    from trl_safeppo import SafePPOConfig

    common = dict(output_dir="unused", use_cpu=True, report_to="none", num_generations=1)
    with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min"):  # a check after GRPO's minimum
        SafePPOConfig(vllm_importance_sampling_clip_min=2.0, vllm_importance_sampling_clip_max=1.0, **common)
    with pytest.raises(ValueError, match="divisible by the global batch size"):  # 5 rows in batches of 2
        SafePPOConfig(per_device_train_batch_size=2, generation_batch_size=5, **common)


# ------------------------------------------------------------------------------------------------- behaviour
class Length:
    __name__ = "length"

    def __call__(self, prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]


class Recorder(GRPOTrainer):
    """A plain GRPOTrainer that records what the hooks the package overrides receive and return."""

    def __init__(self, *args, **kwargs):
        self.seen: dict[str, list] = {"rewards": [], "batches": [], "served": [], "logps": [], "events": []}
        super().__init__(*args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.seen["rewards"].append((out, len(completion_ids_list), completion_ids_list))
        return out

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.seen["batches"].append(out)
        return out

    def _prepare_inputs(self, generation_batch):
        out = super()._prepare_inputs(generation_batch)
        if self.model.training:
            self.seen["served"].append(out)
        return out

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        self.seen["logps"].append(out)
        return out


class Events(TrainerCallback):
    def __init__(self, trainer_ref, output_dir):
        self.trainer_ref, self.output_dir, self.log = trainer_ref, output_dir, []

    def on_save(self, args, state, control, **kwargs):
        import os

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.log.append(("save", os.path.isfile(os.path.join(folder, "trainer_state.json"))))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_debug_path):
    output_dir = str(tmp_path_factory.mktemp("contract"))
    args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=4, num_generations=2, steps_per_generation=2,
                      num_iterations=2, max_completion_length=6, max_steps=4, beta=0.1, learning_rate=1e-2,
                      logging_steps=1, save_strategy="steps", save_steps=4, report_to="none", use_cpu=True, seed=0)
    dataset = Dataset.from_dict({"prompt": [f"Count to {i}:" for i in range(16)]})
    ref = []
    events = Events(ref, output_dir)
    trainer = Recorder(model=tiny_debug_path, reward_funcs=[Length(), Length()], args=args, train_dataset=dataset,
                       callbacks=[events])
    ref.append(trainer)
    trainer.train()
    return trainer, events


def test_calculate_rewards_returns_the_gathered_per_function_rewards(recorded):
    trainer, _ = recorded
    out, n_local, ids = trainer.seen["rewards"][0]
    require(isinstance(out, torch.Tensor) and out.dtype.is_floating_point and tuple(out.shape) == (n_local, 2),
            f"GRPOTrainer._calculate_rewards returning a float (B, K) tensor (got {type(out).__name__} "
            f"{tuple(getattr(out, 'shape', ()))}, expected ({n_local}, 2))", REWARDS)
    require(torch.equal(out[:, 0], out[:, 1]) and bool((out[:, 0] > 0).all()),
            "one column per reward function in GRPOTrainer._calculate_rewards (two identical functions, two equal "
            "columns)", REWARDS)
    require(isinstance(ids, list) and all(isinstance(x, list) for x in ids),
            "completion_ids_list passed to _calculate_rewards as a list of token-id lists", REWARDS)


def test_generate_and_score_returns_the_batch_the_package_post_processes(recorded):
    trainer, _ = recorded
    out = trainer.seen["batches"][0]
    require(isinstance(out, dict), "GRPOTrainer._generate_and_score_completions returning a dict", PPO)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "ref_per_token_logps",
                "old_per_token_logps"):
        require(isinstance(out.get(key), torch.Tensor), f"the {key!r} tensor of _generate_and_score_completions' "
                "output (beta 0.1, num_iterations 2)", PPO + ", " + KL)
    b, t = out["completion_ids"].shape
    require(b == 8, f"_generate_and_score_completions' batch being the generation batch ({b} rows, expected 8)", PPO)
    for key in ("completion_mask", "ref_per_token_logps", "old_per_token_logps"):
        require(tuple(out[key].shape) == (b, t), f"the (B, T) shape of {key!r} ({tuple(out[key].shape)})", PPO)
    require(tuple(out["advantages"].shape) == (b,), "GRPO's (B,) advantages, which PPO replaces by (B, T)", PPO)


def test_prepare_inputs_serves_slices_of_the_rollout_and_regenerates_on_none(recorded):
    trainer, _ = recorded
    served, batches = trainer.seen["served"], trainer.seen["batches"]
    # 4 micro-steps, steps_per_generation 2, num_iterations 2: one rollout of 8 rows served as 2 slices of 4, twice
    require(len(batches) == 1 and len(served) == 4, f"GRPOTrainer generating once per steps_per_generation * "
            f"num_iterations micro-steps ({len(batches)} rollouts for {len(served)} micro-steps)", PPO)
    rows = [tuple(s["completion_ids"].shape)[0] for s in served]
    require(rows == [4, 4, 4, 4], f"_prepare_inputs serving per_device_train_batch_size rows ({rows})", PPO)
    first, second = served[0]["prompt_ids"], served[2]["prompt_ids"]
    require(torch.equal(first, second), "GRPO serving the same slices in every epoch (PPO reshuffles them)", PPO)
    # `_buffered_inputs = None` makes the next training micro-step generate anew (tripwire rollback)
    trainer.model.train()
    trainer._buffered_inputs = None
    n = len(batches)
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    require(len(trainer.seen["batches"]) == n + 1, "GRPOTrainer._prepare_inputs generating when _buffered_inputs is "
            "None", TRIPWIRES + " (restore_snapshot)")


def test_per_token_logps_returns_a_triple_of_b_by_t(recorded):
    trainer, _ = recorded
    logps, entropies, *rest = trainer.seen["logps"][0]
    require(isinstance(logps, torch.Tensor) and logps.dim() == 2 and len(rest) == 1,
            "GRPOTrainer._get_per_token_logps_and_entropies returning (logps (B, T), entropies, aux)", PPO + ", " + KL)


def test_metrics_store_and_kl_logged_per_step(recorded):
    trainer, _ = recorded
    store = trainer._metrics
    require(isinstance(store, dict) and "train" in store and isinstance(store["train"], dict),
            "GRPOTrainer._metrics being {mode: {name: list}}", MIXIN + ", " + KL + ", " + PPO)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    require(all("kl" in h for h in logs), "GRPO logging `kl` at every step when beta != 0", KL + " (per-step feed)")
    require(isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor),
            "Trainer._tr_loss (the accumulated loss tensor)", TRIPWIRES + " (restore_snapshot zeroes a NaN)")


def test_compute_loss_takes_per_token_advantages_and_gates_kl_by_beta(recorded):
    trainer, _ = recorded
    inputs = dict(trainer.seen["served"][0])
    b, t = inputs["completion_ids"].shape
    inputs["advantages"] = torch.ones(b, t)  # PPO's (B, T) advantages
    inputs["ref_per_token_logps"] = inputs["ref_per_token_logps"] - 3.0  # a large KL to the reference
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        with_kl = trainer.compute_loss(trainer.model, inputs)
        beta, trainer.beta = trainer.beta, 0.0
        without = trainer.compute_loss(trainer.model, inputs)
        trainer.beta = beta
    require(with_kl.dim() == 0 and without.dim() == 0, "GRPOTrainer.compute_loss returning a scalar for (B, T) "
            "advantages", PPO)
    require(not torch.allclose(with_kl, without), "GRPOTrainer.compute_loss adding the KL term only when beta != 0",
            PPO + " (sets beta to 0 around super().compute_loss so the KL stays in the reward)")


def test_on_save_follows_the_checkpoint(recorded):
    _, events = recorded
    saves = [written for name, written in events.log if name == "save"]
    require(saves == [True], f"on_save firing once the checkpoint folder is written ({saves})",
            MIXIN + " (rails state), " + PPO + " (critic), " + DPO + " (beta)")
