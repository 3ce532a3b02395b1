"""Sparsity schedules: frozen dataclasses mapping a step to a target sparsity.

Every schedule is `schedule(step) -> sparsity` with `step` an int or a traced int32 scalar, so
the updaters can evaluate it inside `optax` `update` under `jax.jit`. Schedules are data (they
can be printed, compared and saved beside a checkpoint), never closures.

GMP uses `PolynomialSchedule`. The paper (appendix B.4) describes its GMP run as "initial 25%
sparsity -> 50% at 25% of training -> 75% by the end". A cubic ramp that starts at step 0 cannot
pass through all three points (it gives 53.9% at 25% of training), so the default delays the
start of the ramp to `t0 = PAPER_RAMP_START * end_step` (~5.5% of training) and holds the initial
sparsity before it; then all three points are hit exactly (see `PolynomialSchedule`).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

# x = 1 - 2**(-1/3) is the ramp progress at which a cubic is half-way: (1 - x)**3 = 1/2.
# Starting the ramp at t0 = T * (1/4 - x) / (1 - x) makes it half-way exactly at T/4.
_HALF_WAY = 1.0 - 2.0 ** (-1.0 / 3.0)
PAPER_RAMP_START = (0.25 - _HALF_WAY) / (1.0 - _HALF_WAY)  # ~0.0550592
# The paper's initial sparsity relative to the final one: 25% of a 75% target.
PAPER_INIT_RATIO = 1.0 / 3.0


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def last_update_before(num_steps: int, update_freq: int) -> int:
    """The last multiple of update_freq strictly below num_steps: the last mask update that runs
    in a loop over steps 0 .. num_steps - 1, hence where a ramp over the whole run must end."""
    last = (num_steps - 1) // update_freq * update_freq
    if last < 1:
        raise ValueError(
            f"{num_steps} steps leave no mask update after step 0 (update_freq {update_freq})"
        )
    return last


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
    """The same sparsity at every step (Static, RigL)."""

    target: float

    def __post_init__(self):
        _check_fraction("target sparsity", self.target)

    @property
    def final_sparsity(self) -> float:
        return self.target

    def __call__(self, step) -> jnp.ndarray:
        """Returns a float32 scalar; `step` is ignored."""
        del step
        return jnp.asarray(self.target, jnp.float32)


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule:
    """Gradual-magnitude-pruning ramp (Zhu & Gupta 2017; accelerated form of Kurtic et al. 2023).

    With t_q = update_freq * floor(step / update_freq) (masks only change on update steps):

        t_q <  t0 :  s = pre_begin_sparsity                    (default: init_sparsity)
        t_q >= t0 :  s = s_f + (s_i - s_f) * (1 - clip((t_q - t0) / (t_end - t0), 0, 1))**power

    so s = s_i at t0 and s = s_f from t_end on. Defaults (`None`) follow the paper's description:
    s_i = s_f / 3 and t0 = PAPER_RAMP_START * t_end (~0.0551 t_end). For s_f = 0.75 this gives
    exactly 25% at step 0, 50% at 0.25 t_end and 75% at t_end. Pass `begin_step=0` for a plain
    cubic from step 0 (then 53.9% at 0.25 t_end).

    `reference_parity=True` reproduces the authors' scheduler, which divides by t_end instead of
    (t_end - t0) and so ends at s_f - (s_f - s_i) * (t0 / t_end)**power, below the target
    whenever t0 > 0 (their DeiT config: pre 5%, 50% at t0 = 240, target 75%, t_end = 450 ends at
    71.2%). The final target is reached on the first update step >= end_step; pick end_step at or
    before the last update step of the run.
    """

    final_sparsity: float
    end_step: int
    init_sparsity: float | None = None
    begin_step: float | None = None
    pre_begin_sparsity: float | None = None
    update_freq: int = 50
    power: float = 3.0
    reference_parity: bool = False

    def __post_init__(self):
        _check_fraction("final sparsity", self.final_sparsity)
        _check_fraction("initial sparsity", self.s_init)
        _check_fraction("pre-begin sparsity", self.s_pre)
        if self.update_freq < 1:
            raise ValueError(f"update_freq must be >= 1, got {self.update_freq}")
        if not 0 <= self.t0 < self.end_step:
            raise ValueError(f"need 0 <= begin_step {self.t0} < end_step {self.end_step}")

    @property
    def s_init(self) -> float:
        """Sparsity at the start of the ramp, s_i."""
        if self.init_sparsity is None:
            return self.final_sparsity * PAPER_INIT_RATIO
        return self.init_sparsity

    @property
    def s_pre(self) -> float:
        """Sparsity before the ramp starts."""
        return self.s_init if self.pre_begin_sparsity is None else self.pre_begin_sparsity

    @property
    def initial(self) -> float:
        """The value at step 0, as a Python float (what the first mask is built at)."""
        return self.s_pre if self.t0 > 0 else self.s_init

    @property
    def t0(self) -> float:
        """Step at which the ramp starts (float: it need not be an update step)."""
        if self.begin_step is None:
            return PAPER_RAMP_START * self.end_step
        return float(self.begin_step)

    def __call__(self, step) -> jnp.ndarray:
        """Sparsity at `step` (int or traced int scalar) as a float32 scalar."""
        freq = self.update_freq
        t = (jnp.asarray(step, jnp.int32) // freq * freq).astype(jnp.float32)
        s_f, s_i = self.final_sparsity, self.s_init
        if self.reference_parity:
            # The authors stop updating after t_end, so the value there is frozen.
            progress = (jnp.clip(t, self.t0, self.end_step) - self.t0) / self.end_step
        else:
            progress = jnp.clip((t - self.t0) / (self.end_step - self.t0), 0.0, 1.0)
        ramp = s_f + (s_i - s_f) * (1.0 - progress) ** self.power
        return jnp.where(t < self.t0, jnp.float32(self.s_pre), ramp).astype(jnp.float32)


def ramp_over_run(final_sparsity: float, num_steps: int, update_freq: int, **options) -> PolynomialSchedule:
    """A `PolynomialSchedule` that reaches `final_sparsity` on the last mask update of a run of
    `num_steps` steps (`last_update_before`); `options`: its other fields."""
    return PolynomialSchedule(final_sparsity=final_sparsity, end_step=last_update_before(num_steps, update_freq),
                              update_freq=update_freq, **options)


@dataclasses.dataclass(frozen=True)
class CosineDecay:
    """`value * (1 + cos(pi * min(step, end_step) / end_step)) / 2`: RigL's drop fraction.

    Decays from `value` at step 0 to exactly 0 at `end_step` and stays 0 after.
    """

    value: float
    end_step: int

    def __post_init__(self):
        if self.end_step < 1:
            raise ValueError(f"end_step must be >= 1, got {self.end_step}")

    def __call__(self, step) -> jnp.ndarray:
        t = jnp.minimum(jnp.asarray(step, jnp.float32), self.end_step)
        frac = self.value * 0.5 * (1.0 + jnp.cos(math.pi * t / self.end_step))
        return jnp.maximum(frac, 0.0).astype(jnp.float32)
