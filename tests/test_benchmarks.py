"""The benchmark harness's own logic (the benchmarks themselves are scripts, not tests)."""

import json
import subprocess
import sys

import pytest

from benchmarks import _harness as h
from benchmarks.run import BENCHMARKS, main


def test_stats_median_min_max():
    # sorted: 1, 2, 3, 10 -> median (2 + 3) / 2 = 2.5
    assert h.stats([3, 1, 10, 2]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}


def test_timed_steps_drops_each_runs_warmup():
    runs = [{"step_seconds": [9.0, 1.0, 2.0]}, {"step_seconds": [8.0, 3.0]}]
    # warm-up 1 drops 9.0 and 8.0, one per run
    assert h.timed_steps(runs, warmup=1) == [1.0, 2.0, 3.0]


def test_model_timer_counts_nested_calls_once(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 20.0])  # enter@0 (outer), nested enter/exit ignored, exit@5; enter@10, exit@20
    monkeypatch.setattr(h.time, "perf_counter", lambda: next(clock))
    timer = h.ModelTimer()
    timer.enter()  # generate
    timer.enter()  # forward inside generate: no clock read
    timer.exit()
    timer.exit()  # closes at 5.0
    timer.enter()
    timer.exit()
    # (5 - 0) + (20 - 10) = 15 seconds; a double count would give more
    assert timer.seconds == 15.0
    # both outermost calls were of the default kind; the nested one did not open a kind of its own
    assert timer.by_kind == {"model": 15.0}


def test_unknown_benchmark_lists_accepted(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err
    for name in BENCHMARKS:
        assert name in err


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_has_help(name):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", name, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--steps" in proc.stdout and "--seed" in proc.stdout and "--out" in proc.stdout


def test_impossible_configuration_is_refused_before_running():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "kl_control", "--steps", "2"], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "--steps=2" in proc.stderr and "at least 8" in proc.stderr


def test_step_timer_measures_end_to_end_intervals(monkeypatch):
    # train begins at 0; steps end at 3, 4.5 and 10 -> steps of 3, 1.5 and 5.5 seconds (logging between steps is in)
    clock = iter([0.0, 3.0, 4.5, 10.0])
    monkeypatch.setattr(h.time, "perf_counter", lambda: next(clock))
    timer = h.step_timer()
    timer.on_train_begin(None, None, None)
    for _ in range(3):
        timer.on_step_end(None, None, None)
    assert timer.step_seconds == [3.0, 1.5, 5.5]


def test_base_config_takes_the_workers_own_args_field():
    import argparse

    cli = argparse.Namespace(model="tiny://debug", steps=3, seed=1, threads=None)
    config = h.base_config(cli, "safe_ppo", args={"num_iterations": 2}, batch=4)
    assert config["args"] == {"num_iterations": 2}
    assert (config["trainer"], config["steps"], config["seed"], config["batch"]) == ("safe_ppo", 3, 1, 4)


def test_rollout_seconds_groups_ppo_epochs():
    from benchmarks.ppo_vs_trl112 import rollout_seconds

    run = {"step_seconds": [4.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 9.0]}
    # 4 epochs per rollout: 4+1+1+1 = 7, 3+1+1+1 = 6; the incomplete trailing rollout (9.0) is dropped
    assert rollout_seconds(run, 4) == [7.0, 6.0]
    assert rollout_seconds(run, 1) == run["step_seconds"]


def test_length_exploit_reward_by_hand():
    from benchmarks._rewards import LengthExploitReward

    reward = LengthExploitReward(bonus_per_token=0.05, max_bonus=2.0)
    completions = [[{"role": "assistant", "content": "<answer>5</answer>"}]] * 3
    ids = [[1] * 10, [1] * 10, [1] * 100]
    # correct + 0.05 * 10 = 1.5; wrong + 0.5 = 0.5; correct + min(2.0, 0.05 * 100 = 5.0) = 3.0
    scores = reward(prompts=["q"] * 3, completions=completions, completion_ids=ids, answer=["5", "4", "5"])
    assert scores == pytest.approx([1.5, 0.5, 3.0])


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("reward_hacking", ["--batch", "6"], "--batch=6"),
        ("reward_hacking", ["--max-completion-length", "8"], "--max-completion-length=8"),
        ("kl_control", ["--target", "0"], "--target=0"),
        ("kl_control", ["--deadband", "-0.5"], "--deadband=-0.5"),
        ("kl_control", ["--adam-beta1", "1"], "--adam-beta1=1.0"),
        ("kl_control", ["--probe", "1"], "--probe=1: use 0 (off) or at least 2 prompts"),
        # the trust region's flag went with rails.kl.max_kl (docs/benchmarks.md section 5)
        ("kl_control", ["--max-kl", "0.65"], "unrecognized arguments: --max-kl 0.65"),
        # argparse: "argument --lr-scheduler: invalid choice: 'cosine' (choose from linear, constant)"; the quoting
        # of the choices differs between Python versions
        ("kl_control", ["--lr-scheduler", "cosine"], "argument --lr-scheduler: invalid choice"),
        ("rails_overhead", ["--repeats", "0"], "--repeats=0"),
    ],
)
def test_bad_flags_name_the_flag(name, argv, message):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", name, *argv], capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_emit_reports_the_import_baseline_below_the_peak(capsys):
    h.mark_imports_done()
    h.emit({"x": 1})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line.removeprefix("BENCHMARK-RESULT "))
    # ru_maxrss never decreases, so the level recorded first is at most the peak reported after it
    assert 0 < result["rss_after_imports_mb"] <= result["peak_rss_mb"]


def test_rails_settings_of_the_benchmarks_are_valid_configs():
    # the benchmarks pass these dicts to the trainers; a renamed rail field must fail here, not after minutes of SFT
    from benchmarks.rails_overhead import ALL_RAILS
    from benchmarks.reward_hacking import GRPO_LENGTH_RAILS, PPO_LENGTH_RAILS
    from trl_safeppo.rails import RailsConfig

    for rails in (GRPO_LENGTH_RAILS, PPO_LENGTH_RAILS):
        RailsConfig.from_dict(rails)  # raises ValueError on an unknown or invalid field
    everything = RailsConfig.from_dict(ALL_RAILS)
    assert type(everything.build_kl_controller()).__name__ == "AdaptiveKLController"
    assert len(everything.tripwires) == len(ALL_RAILS["tripwires"]) == 7


def test_kl_control_runs_pass_valid_rails_configs(monkeypatch):
    # kl_control builds its rails dicts from the flags; a removed or renamed rails.kl field must fail here, not after
    # minutes of SFT: stop the benchmark where it would start the runs and parse what it would pass
    import benchmarks.kl_control as kl_control
    from trl_safeppo.rails import RailsConfig

    seen = {}

    def stop(configs, repeats):
        seen.update(configs)
        raise SystemExit(0)

    monkeypatch.setattr(kl_control, "sft_warm_start", lambda cli: cli.model)
    monkeypatch.setattr(kl_control, "interleaved", stop)
    with pytest.raises(SystemExit):
        kl_control.main(["--steps", "8", "--hold-until-target", "--deadband", "0.5", "--proportional", "2",
                         "--measure-before-update", "--min-coef", "0.04"])
    assert sorted(seen) == ["adaptive", "fixed"]
    adaptive = RailsConfig.from_dict(seen["adaptive"][1]["rails"]).kl
    assert (adaptive.controller, adaptive.target, adaptive.proportional, adaptive.measure_before_update) == (
        "adaptive", 0.5, 2.0, True)
    assert RailsConfig.from_dict(seen["fixed"][1]["rails"]).kl.controller == "fixed"


def test_sft_warm_start_keeps_a_real_model_id():
    import argparse

    # only tiny:// models get the embedded SFT pass; a Hub id is taken as already instruction-tuned
    cli = argparse.Namespace(model="Qwen/Qwen2.5-0.5B-Instruct", seed=0)
    assert h.sft_warm_start(cli) == "Qwen/Qwen2.5-0.5B-Instruct"


def test_exact_kl_by_hand():
    import math

    import torch

    from benchmarks._worker import exact_kl

    # position 0: pi = softmax(0, 0) = (1/2, 1/2), pi_ref = softmax(0, ln 3) = (1/4, 3/4):
    #   KL = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841
    # position 1: pi = pi_ref, KL = 0; position 2 is masked out (its logits would give a large KL)
    policy = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [9.0, -9.0]]])
    ref = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0], [-9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert exact_kl(policy, ref, mask) == pytest.approx(0.5 * math.log(4 / 3) / 2, rel=1e-6)  # mean of 0.1438, 0
    assert exact_kl(policy, policy, torch.ones(1, 3)) == pytest.approx(0.0, abs=1e-7)


def test_clustered_mean_se_by_hand():
    import math

    import torch

    from benchmarks._worker import clustered_mean_se

    # two prompts, two completions each, one or two counted tokens per row:
    #   group 0: rows [1, 1] and [0, x] (x masked) -> S_0 = 2, N_0 = 3;  group 1: rows [3, 3], [4, 4] -> S_1 = 14, N_1 = 4
    #   R = 16 / 7 = 2.285714; residuals S_g - R N_g = 2 - 48/7 = -34/7 and 14 - 64/7 = 34/7
    #   SE = sqrt(2 / 1 * 2 * (34/7)^2) / 7 = 2 * 34 / 49 = 1.387755
    values = torch.tensor([[1.0, 1.0], [0.0, 9.0], [3.0, 3.0], [4.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    mean, se = clustered_mean_se(values, mask, torch.tensor([0, 0, 1, 1]))
    assert mean == pytest.approx(16 / 7) and se == pytest.approx(68 / 49)
    # every group with the same mean: nothing owed to which prompts were drawn
    assert clustered_mean_se(values[2:3].repeat(4, 1), mask[2:3].repeat(4, 1), torch.tensor([0, 0, 1, 1]))[1] == 0
    # one group: no spread between groups to measure
    assert math.isnan(clustered_mean_se(values, mask, torch.zeros(4, dtype=torch.long))[1])


class _CharLength:
    """Reward = completion length in characters: differs between completions, so advantages are non-zero."""

    __name__ = "char_length"

    def __call__(self, prompts, completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]


def test_exact_kl_trainer_logs_each_batch_and_trains_identically(tmp_path, tiny_debug_path):
    from datasets import Dataset

    from benchmarks._worker import with_exact_kl
    from trl_safeppo import SafeGRPOConfig, SafeGRPOTrainer

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(16)]})
    logs = {}
    probe = [[{"role": "user", "content": f"What is {i} + 2?"}] for i in range(3)]
    for name, cls in (("plain", SafeGRPOTrainer), ("exact", with_exact_kl(SafeGRPOTrainer, probe))):
        args = SafeGRPOConfig(output_dir=str(tmp_path / name), max_steps=3, save_strategy="no", logging_steps=1,
                              per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                              learning_rate=1e-2, beta=0.1, seed=0, report_to="none", use_cpu=True, rails={})
        trainer = cls(model=tiny_debug_path, reward_funcs=_CharLength(), args=args, train_dataset=dataset)
        trainer.train()
        logs[name] = [h for h in trainer.state.log_history if "loss" in h]
    keys = ("loss", "kl", "reward", "grad_norm")
    # the extra forwards run without gradient and the probe samples under its own forked random state:
    # training is unchanged
    assert [{k: h[k] for k in keys} for h in logs["exact"]] == [{k: h[k] for k in keys} for h in logs["plain"]]
    exact = [h["kl/exact"] for h in logs["exact"]]
    # the first batch is sampled before any update, when the policy is the reference: KL 0 (float noise only);
    # after an update at lr 1e-2 the policy has moved (its k3 `kl` is > 0 too), and a KL is never negative
    assert exact[0] == pytest.approx(0.0, abs=1e-6)
    assert logs["exact"][-1]["kl"] > 0 and exact[-1] > 1e-6
    # one prompt per batch (4 completions of it): no spread between prompts to measure a standard error from
    assert not any("kl/exact_se" in h for h in logs["exact"])
    # the probe reads the same policy on its 3 fixed prompts: 0 before any update, > 0 once it has moved
    probe_kl = [h["kl/probe"] for h in logs["exact"]]
    assert probe_kl[0] == pytest.approx(0.0, abs=1e-6) and probe_kl[-1] > 1e-6
    assert all(h["kl/probe_se"] >= 0 for h in logs["exact"])


def test_probe_kl_reads_what_grpo_samples(tmp_path, tiny_debug_path):
    # The probe must sample as GRPO does. Given GRPO's own prompts (each repeated num_generations times) and the
    # same random state, it must draw the very same completions, so its KL equals the batch's exact KL.
    import torch
    from datasets import Dataset

    from benchmarks._worker import probe_kl, with_exact_kl
    from trl_safeppo import SafeGRPOConfig, SafeGRPOTrainer

    prompts = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(16)]
    args = SafeGRPOConfig(output_dir=str(tmp_path), max_steps=2, save_strategy="no", logging_steps=1,
                          per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                          learning_rate=1e-2, beta=0.1, seed=0, report_to="none", use_cpu=True, rails={},
                          gradient_checkpointing=True)
    trainer = with_exact_kl(SafeGRPOTrainer)(model=tiny_debug_path, reward_funcs=_CharLength(), args=args,
                                             train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.train()  # two updates at lr 1e-2: the policy is no longer the reference
    batch = [{"prompt": p} for p in prompts[:2] for _ in range(4)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        trainer._generate_and_score_completions(batch)
    grpo = trainer._metrics["train"]["kl/exact"][-1]
    probe, _ = probe_kl(trainer, [row["prompt"] for row in batch], seed=5)
    assert grpo > 1e-4 and probe == pytest.approx(grpo, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# stage_ablation: argument handling and the plan of each variant (no training)
_CHAIN = [{"type": "sft"}, {"type": "ppo"}, {"type": "grpo"}, {"type": "rejection_sampling"},
          {"type": "sft", "name": "sft-rs"}, {"type": "dpo"}, {"type": "eval", "name": "final-eval"}]


def _names(stages):
    from benchmarks.stage_ablation import stage_name

    return [stage_name(s) for s in stages]


@pytest.mark.parametrize(
    "removed, start, rerun",
    [
        # a variant starts after the last training stage before the removed one and reruns the rest without it
        ("ppo", "sft", ["grpo", "rejection_sampling", "sft-rs", "dpo"]),
        ("grpo", "ppo", ["rejection_sampling", "sft-rs", "dpo"]),
        # rejection sampling is not training: no RS-SFT starts from GRPO and reruns it, for DPO's pairs
        ("sft-rs", "grpo", ["rejection_sampling", "dpo"]),
        # the last training stage: the full chain's model before it, nothing to rerun
        ("dpo", "sft-rs", []),
    ],
)
def test_stage_ablation_plans_each_variant_from_the_shared_prefix(removed, start, rerun):
    from benchmarks.stage_ablation import plan_variant

    prefix, rest = plan_variant(_CHAIN, removed)
    assert prefix == start and _names(rest) == rerun  # eval stages are dropped: the benchmark scores the policy


def test_stage_ablation_variant_first_stage_stops_instead_of_carrying():
    # The demo gates GRPO with on_fail: carry_previous. Without PPO, GRPO is the variant's first training stage, where
    # pre-flight refuses carry_previous (no previous stage): the variant's copy stops instead; the recipe is untouched.
    import copy

    from benchmarks.stage_ablation import plan_variant

    chain = copy.deepcopy(_CHAIN)
    for s in chain:
        if s["type"] in ("ppo", "grpo"):
            s["gate"] = {"max_heldout_drop": 0.1, "on_fail": "carry_previous"}
    _, rest = plan_variant(chain, "ppo")
    assert _names(rest)[0] == "grpo" and rest[0]["gate"] == {"max_heldout_drop": 0.1, "on_fail": "stop"}
    assert chain[2]["gate"]["on_fail"] == "carry_previous"
    _, rest = plan_variant(chain, "grpo")  # starts after PPO: the first rerun stage trains nothing, gates unchanged
    assert all(s.get("gate", {}).get("on_fail") != "stop" for s in rest)


def test_stage_ablation_full_chain_reruns_nothing_and_first_stage_cannot_go():
    from benchmarks.stage_ablation import plan_variant

    assert plan_variant(_CHAIN, None) == (None, [])
    with pytest.raises(SystemExit, match="first training stage"):
        plan_variant(_CHAIN, "sft")
    with pytest.raises(SystemExit, match="no stage named 'kto'"):
        plan_variant(_CHAIN, "kto")


def test_stage_ablation_caps_every_training_stage():
    from benchmarks.stage_ablation import cap_steps

    # 5 training stages of 7 (rejection sampling and eval do not train)
    assert cap_steps(_CHAIN, 2) == [f"stages.{n}.args.max_steps=2" for n in ("sft", "ppo", "grpo", "sft-rs", "dpo")]
    assert cap_steps(_CHAIN, None) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "full", "no KTO"], "--variants: unknown 'no KTO'"),
        (["--seeds", "0", "0"], "--seeds=[0, 0]: a seed is repeated"),
        (["--steps", "0"], "--steps=0: must be >= 1"),
        (["--kl-samples", "0"], "--kl-samples=0: must be >= 1"),
        (["--seeds", "0", "1", "--full-run-dir", "runs/demo"], "several seeds need a template with {seed}"),
        (["--recipe", "no/such.yaml"], "--recipe='no/such.yaml': no such file"),
    ],
)
def test_stage_ablation_refuses_bad_arguments_before_running(argv, message):
    from benchmarks.stage_ablation import parse_args

    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert message in str(err.value)


def test_stage_ablation_defaults_and_seed_shorthand(tmp_path):
    from benchmarks.stage_ablation import VARIANTS, parse_args

    args = parse_args([])
    assert args.seeds == [0, 1, 2] and args.variants == list(VARIANTS) and args.steps is None
    assert parse_args(["--seed", "4"]).seeds == [4]
    # one seed may name its full run without a template
    assert parse_args(["--seed", "1", "--full-run-dir", str(tmp_path)]).full_run_dir == str(tmp_path)


def test_stage_ablation_table_means_over_seeds_and_marks_gated_runs(tmp_path):
    import argparse

    from benchmarks.stage_ablation import markdown, plot, table

    def scored(acc, gated=None):
        return {"accuracy": acc, "format_pass_rate": 1.0, "mean_length": 19.0, "kl_to_sft": 2.0, "gated": gated}

    results = {
        0: {"sft": scored(0.8), "variants": {"full": scored(0.9), "no PPO": scored(0.7, gated="grpo")}},
        1: {"sft": scored(0.6), "variants": {"full": scored(0.8), "no PPO": {"not_run": "stopped"}}},
    }
    rows = table(results, ["full", "no PPO"])
    # SFT: (0.8 + 0.6) / 2 = 0.7; full: (0.9 + 0.8) / 2 = 0.85; no PPO: seed 1 not run, so the mean of seed 0 alone
    assert rows[0][:2] == ("SFT warm start", "0.700 (0.800 / 0.600)")
    assert rows[1][:2] == ("full", "0.850 (0.900 / 0.800)")
    assert rows[2][1] == "0.700 (0.700 (gated) / -)"
    md = markdown(rows, [0, 1])
    assert md.count("\n|") == 4 and "seeds 0, 1" in md  # header, rule, three rows
    fig = plot(results, ["full", "no PPO"], argparse.Namespace(recipe="recipes/demo.yaml"))
    fig.savefig(tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
