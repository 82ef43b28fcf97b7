"""KL control: the adaptive and fixed KL coefficient controllers, and per-token KL estimators.

Controllers follow Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
(https://arxiv.org/abs/1909.08593, section 2.2; reference code openai/lm-human-preferences `AdaptiveKLController`):

    e_t     = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1 = beta_t * (1 + K_beta * e_t),    K_beta = n_steps / horizon

then clamped to [min_coef, max_coef]. `min_coef > 0` keeps beta off 0: GRPOTrainer loads no reference model when
`beta == 0`, so an adaptive beta that reached 0 would break the run.

Two optional refinements, both off by default (off = exactly Ziegler's rule), for short runs and noisy KL:

- `hold_until_target`: beta is not lowered before the measured KL has reached the target once. Training starts
  with the policy equal to the reference (KL = 0), so Ziegler's rule reads the first steps as "too little KL" and
  cuts beta just as the policy starts to move; with a short horizon that cut can be tenfold before KL arrives.
- `deadband`: no update while `|KL / target - 1| <= deadband`. Per-step KL is noisy; inside the band beta holds
  instead of random-walking, and it moves only when KL has left the band (benchmarks/kl_control.py measures both).

And one addition, off by default: a proportional term. Ziegler's rule is integral control: beta accumulates the
error, so it reacts to a jump in KL only over several updates and keeps pushing after KL has turned, which makes
it overshoot (the KL coefficient is a Lagrange multiplier of a KL constraint; Stooke et al. 2020, "Responsive
Safety in Reinforcement Learning by PID Lagrangian Methods", https://arxiv.org/abs/2007.03964, show the same for
integral-only multipliers and add proportional and derivative terms). With `proportional = k_p > 0` the rule
above moves a base value, and the coefficient used is

    beta_t = clamp(base_t * exp(k_p * clip(KL_t / KL_target - 1, -1, 1)), min_coef, max_coef)

so a KL at twice the target multiplies beta by e^k_p at once, and a KL back at the target returns it to the base.

Estimators of KL(pi || pi_ref) per token, with `log r = ref_logp - logp` on tokens sampled from pi
(Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html):

    k1 = -log r = logp - ref_logp                 unbiased, can be negative
    k2 = (log r)^2 / 2                            biased, low variance, >= 0
    k3 = (r - 1) - log r                          unbiased, low variance, >= 0 (TRL GRPO's estimator)

Torch is not imported here at module level: the estimators only use tensor methods.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
_ZIEGLER_CLIP = 0.2  # proportional error clip, Ziegler et al. 2019


def adaptive_kl_step(
    value: float,
    current_kl: float,
    n_steps: int,
    target: float,
    horizon: float,
    min_coef: float,
    max_coef: float,
    *,
    allow_decrease: bool = True,
    deadband: float = 0.0,
) -> float:
    """One Ziegler update of the KL coefficient (pure): returns the new beta.

    A non-finite `current_kl` leaves beta unchanged (the non-finite tripwire reports it). With `deadband > 0`, a KL
    within `(1 +- deadband) x target` leaves it unchanged too; with `allow_decrease=False` beta only rises or holds.
    """
    if not math.isfinite(current_kl):
        return value
    error = current_kl / target - 1.0
    if abs(error) <= deadband or (error < 0 and not allow_decrease):
        return value
    proportional_error = min(max(error, -_ZIEGLER_CLIP), _ZIEGLER_CLIP)
    mult = 1.0 + proportional_error * n_steps / horizon
    return min(max(value * mult, min_coef), max_coef)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): beta moves so that the measured KL tracks `target`.

    Args:
        init_kl_coef: initial beta, in [min_coef, max_coef].
        target: KL target (> 0), in the unit the trainer measures (PPO: nats per sequence; GRPO: per token).
        horizon: the number of samples over which beta can move by about 20 % (> 0).
        min_coef: lower bound on beta (> 0; GRPO needs beta > 0).
        max_coef: upper bound on beta (>= min_coef).
        hold_until_target: do not lower beta before the measured KL has reached `target` once (default False).
        deadband: no update while `|KL / target - 1| <= deadband` (>= 0; default 0: always update).
        proportional: gain k_p of the proportional term (>= 0; default 0: Ziegler's integral rule alone).

    State (`state_dict()`): `{"type": "adaptive", "value": beta, "base": float, "n_updates": int,
    "last_kl": float | None, "reached_target": bool}`; `base` is the integral part (equal to `value` when
    `proportional == 0`).
    """

    def __init__(
        self,
        init_kl_coef: float,
        target: float,
        horizon: float,
        min_coef: float = 1e-4,
        max_coef: float = 10.0,
        *,
        hold_until_target: bool = False,
        deadband: float = 0.0,
        proportional: float = 0.0,
    ) -> None:
        validate_adaptive_kl(
            init_kl_coef, target, horizon, min_coef, max_coef, hold_until_target, deadband, proportional
        )
        self.value = float(init_kl_coef)
        self.base = float(init_kl_coef)
        self.proportional = float(proportional)
        self.target = float(target)
        self.horizon = float(horizon)
        self.min_coef = float(min_coef)
        self.max_coef = float(max_coef)
        self.hold_until_target = bool(hold_until_target)
        self.deadband = float(deadband)
        self.n_updates = 0
        self.last_kl: float | None = None
        self.reached_target = False

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta after a batch of `n_steps` samples whose measured KL is `current_kl`; returns the new beta."""
        current_kl = float(current_kl)
        finite = math.isfinite(current_kl)
        self.reached_target = self.reached_target or (finite and current_kl >= self.target)
        self.base = adaptive_kl_step(
            self.base, current_kl, n_steps, self.target, self.horizon, self.min_coef, self.max_coef,
            allow_decrease=self.reached_target or not self.hold_until_target, deadband=self.deadband,
        )
        if finite:  # a non-finite KL leaves beta as it was (the non-finite tripwire reports it)
            error = min(max(current_kl / self.target - 1.0, -1.0), 1.0)
            factor = math.exp(self.proportional * error)  # exactly 1 for k_p = 0: Ziegler's rule alone
            self.value = min(max(self.base * factor, self.min_coef), self.max_coef)
        self.n_updates += 1
        self.last_kl = current_kl if finite else None
        return self.value

    def set_value(self, value: float) -> None:
        """Set beta from outside (e.g. the `raise_kl` tripwire action): the base moves with it, so the next update
        continues from there instead of snapping back."""
        self.value = self.base = float(value)

    def state_dict(self) -> dict[str, Any]:
        return {"type": "adaptive", "value": self.value, "base": self.base, "n_updates": self.n_updates,
                "last_kl": self.last_kl, "reached_target": self.reached_target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_type(state, "adaptive")
        self.value = float(state["value"])
        self.base = float(state.get("base", self.value))
        self.n_updates = int(state.get("n_updates", 0))
        self.last_kl = state.get("last_kl")
        self.reached_target = bool(state.get("reached_target", False))

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(value={self.value:.6g}, target={self.target}, horizon={self.horizon}, "
            f"min_coef={self.min_coef}, max_coef={self.max_coef}, hold_until_target={self.hold_until_target}, "
            f"deadband={self.deadband}, proportional={self.proportional})"
        )


class FixedKLController:
    """Constant KL coefficient; `update` only counts calls. `kl_coef >= 0` (0 disables the KL term).

    State (`state_dict()`): `{"type": "fixed", "value": beta, "n_updates": int}`.
    """

    def __init__(self, kl_coef: float) -> None:
        if not (isinstance(kl_coef, (int, float)) and math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)
        self.n_updates = 0

    def update(self, current_kl: float, n_steps: int) -> float:
        self.n_updates += 1
        return self.value

    def set_value(self, value: float) -> None:
        """Set beta from outside (e.g. the `raise_kl` tripwire action)."""
        self.value = float(value)

    def state_dict(self) -> dict[str, Any]:
        return {"type": "fixed", "value": self.value, "n_updates": self.n_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_type(state, "fixed")
        self.value = float(state["value"])
        self.n_updates = int(state.get("n_updates", 0))

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value:.6g})"


def _check_type(state: dict[str, Any], expected: str) -> None:
    if state.get("type", expected) != expected:
        raise ValueError(f"cannot load a {state.get('type')!r} KL controller state into a {expected!r} controller")


def validate_adaptive_kl(
    init_kl_coef: float | None,
    target: float,
    horizon: float,
    min_coef: float,
    max_coef: float,
    hold_until_target: bool = False,
    deadband: float = 0.0,
    proportional: float = 0.0,
    *,
    where: str = "",
    init_name: str = "init_kl_coef",
) -> None:
    """The one check of the adaptive controller's settings (the controller, ``rails.kl`` and the trainers use it):
    raise ValueError naming the first bad setting, its value and its accepted range. ``where`` prefixes each name
    (``"rails.kl."``); ``init_kl_coef=None`` (a config whose trainer supplies beta) skips its range check."""

    def finite(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def bad(name: str, accepted: str, value: Any, why: str = "") -> ValueError:
        return ValueError(f"{where}{name} must be {accepted}, got {value!r}{why}")

    if not (finite(target) and target > 0):
        raise bad("target", "a finite number > 0", target, " (the KL to track)")
    if not (finite(horizon) and horizon > 0):
        raise bad("horizon", "a finite number > 0", horizon, " (samples per ~20% move of beta)")
    if not (finite(min_coef) and min_coef > 0):
        raise bad("min_coef", "a finite number > 0", min_coef, " (GRPO loads no reference model when beta == 0)")
    if not (isinstance(max_coef, (int, float)) and max_coef >= min_coef):
        raise bad("max_coef", f">= min_coef ({min_coef})", max_coef)
    if init_kl_coef is not None and not (finite(init_kl_coef) and min_coef <= init_kl_coef <= max_coef):
        raise ValueError(
            f"{where if init_name == 'init_kl_coef' else ''}{init_name} must be in [min_coef, max_coef] = "
            f"[{min_coef}, {max_coef}] for the adaptive controller, got {init_kl_coef!r}"
        )
    if not isinstance(hold_until_target, bool):
        raise bad("hold_until_target", "true or false", hold_until_target)
    if not (finite(deadband) and deadband >= 0):
        raise bad("deadband", "a finite number >= 0", deadband, " (0.5 holds beta while KL is in [0.5, 1.5] x target)")
    if not (finite(proportional) and proportional >= 0):
        raise bad("proportional", "a finite number >= 0", proportional, " (0: Ziegler's rule alone)")


def kl_per_token(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi.

    Args:
        logp: `(B, T)` log-probabilities of the sampled tokens under the policy.
        ref_logp: `(B, T)` the same under the reference model.
        estimator: "k1", "k2" or "k3" (see the module docstring).
        mask: `(B, T)` 1 on response tokens; the result is 0 elsewhere (KL counts on response tokens only).

    Returns:
        `(B, T)` per-token KL. Use the same estimator for the penalty and for the logged `kl`.
    """
    log_ratio = logp - ref_logp  # log pi/pi_ref = -log r
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio.square()
    elif estimator == "k3":
        kl = (-log_ratio).exp() - 1.0 + log_ratio  # (r - 1) - log r, r = pi_ref / pi
    else:
        raise ValueError(f"estimator must be one of {list(KL_ESTIMATORS)}, got {estimator!r}")
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    return kl


def kl_exact(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) of the next-token distributions at each position, summed over the whole vocabulary:
    `sum_v pi(v) (log pi(v) - log pi_ref(v))`. No token is sampled, so it has none of the per-token estimators'
    sampling spread (k3's is heavy-tailed: its batch mean usually reads below the KL and now and then far above).

    Args:
        logits: `(B, T, V)` next-token logits of the policy (already divided by the sampling temperature).
        ref_logits: `(B, T, V)` the same for the reference model.

    Returns:
        `(B, T)` KL per position (computed in float32).
    """
    logp, ref_logp = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` per-sequence KL: the sum of per-token KL over response tokens (what PPO's controller measures)."""
    return (kl * mask.to(kl.dtype)).sum(dim=1)


def kl_penalized_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """PPO token rewards (Ziegler et al. 2019; Ouyang et al. 2022): `r_t = -beta * kl_t`, plus the sequence score
    on the last valid response token.

    Args:
        scores: `(B,)` shaped sequence-level rewards (after the reward rails).
        kl: `(B, T)` per-token KL (from `kl_per_token`, 0 on padding).
        mask: `(B, T)` response mask: 0 on right padding, and on the tokens a tool or environment wrote in a
            multi-turn rollout (holes in the middle are allowed). A row without a valid token gets no score.
        kl_coef: beta.

    Returns:
        `(B, T)` token rewards, 0 where `mask` is 0.
    """
    import torch

    maskf = mask.to(kl.dtype)
    rewards = -kl_coef * kl * maskf
    valid = mask.bool()
    positions = torch.arange(1, valid.shape[1] + 1, device=valid.device)
    last = ((positions * valid).amax(dim=1) - 1).clamp(min=0)  # index of the last valid token (0 for an empty row)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * valid.any(dim=1).to(rewards.dtype)
    return rewards
