"""The private members of TRL and transformers that trl_safeppo touches: each once, here, with the reason.

Every other touch point is public API: ``super()`` calls of the trainers' public methods (``compute_loss``,
``training_step``, ``train``, ``create_scheduler``), ``TrainerCallback`` events (``on_train_begin``,
``on_train_end``, ``on_evaluate``, ``on_step_begin``, ``on_step_end``, ``on_log``, ``on_save``) and public attributes
(``beta``, ``ref_model``, ``reward_funcs``, ``reward_weights``, ``eos_token_ids``, ``processing_class``, ...).
``tests/trainers/test_trl_surface.py`` scans the package and fails when it touches a private TRL/transformers member
that is not listed below, or when the list grows past :data:`MAX_PRIVATE_MEMBERS`;
``tests/test_trl_contract.py`` exercises the hooks on a tiny model.

GRPOTrainer hooks overridden (each through ``super()``, the result post-processed):

- ``_calculate_rewards``: the reward rails act on GRPO's gathered per-function rewards before GRPO sums and
  normalizes them (``rails_mixin.SafeRailsMixin``, ``reward_rails.RewardStage``). No public hook sits between
  scoring and normalization.
- ``_generate_and_score_completions``: PPO's rollout (critic values, GAE targets) and GRPO's KL of each new batch
  (``rails.kl.measure_before_update``) post-process the batch GRPO built. No public hook returns the batch.
- ``_prepare_inputs`` (also a transformers ``Trainer`` method): PPO reshuffles a rollout into fresh minibatches at
  every epoch.
- ``_get_per_token_logps_and_entropies``: called for the policy's log-probabilities (PPO's rollout, the KL
  measurements), and overridden by PPO to read the log-probabilities of its loss (approx KL, clip fraction) instead
  of computing them twice.

GRPOTrainer / Trainer state:

- ``_metrics``: GRPO's metric store; every metric the package logs is appended there, so that GRPO averages and
  logs it with its own (there is no public ``log_metric``).
- ``_buffered_inputs``: set to ``None`` after a tripwire rollback, which is GRPO's documented way (its comment: "can
  occur when resuming from a checkpoint") to make it generate the next batch from the restored policy.
- ``_tr_loss``: a non-finite accumulated loss is zeroed after a rollback; the Trainer resets it with ``-=`` after
  each log, which keeps a NaN forever.

transformers model attribute:

- ``_no_split_modules``: under FSDP2 the critic is sharded by accelerate's own ``fsdp2_prepare_model``, which finds
  the transformer blocks to wrap through the module's ``_no_split_modules``; the critic's ``ValueModel`` wrapper
  carries its inner model's list (``sharding.prepare_critic``).
"""

from __future__ import annotations

MAX_PRIVATE_MEMBERS = 8

# the allow-list; the reasons are in the module docstring
PRIVATE_MEMBERS = (
    "_calculate_rewards", "_generate_and_score_completions", "_prepare_inputs", "_get_per_token_logps_and_entropies",
    "_metrics", "_buffered_inputs", "_tr_loss", "_no_split_modules",
)
