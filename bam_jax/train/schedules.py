"""Per-step schedules, each a pure function of the step, matching the official arrays.

The official code precomputes numpy arrays (`utils.cosine_scheduler`) and indexes them by
iteration (lr, weight decay, teacher momentum) or by epoch (ε). Here each schedule is a
jittable function of the step, so a resumed run never replays or restarts one. Steps past
the end hold the last value (the official arrays would be indexed out of range).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

# `BAMLoss.build_from_args` ramps ε linearly over a hard-coded 30 epochs.
SINKHORN_REG_RAMP_EPOCHS = 30


def cosine_schedule(base_value: float, final_value: float, total_steps: int,
                    warmup_steps: int = 0, warmup_start_value: float = 0.0) -> Schedule:
    """`utils.cosine_scheduler`: linear warm-up, then cosine from base towards final.

    The warm-up is `np.linspace(start, base, warmup_steps)`, both ends included; the
    cosine runs over `t = 0 .. T-1` with `T = total - warmup`, so `final_value` itself is
    never reached.
    """
    if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
        raise ValueError(f'need 0 <= warmup_steps ({warmup_steps}) <= total_steps '
                         f'({total_steps}) and total_steps > 0')
    decay_steps = total_steps - warmup_steps

    def schedule(step):
        step = jnp.clip(jnp.asarray(step), 0, total_steps - 1)
        t = jnp.maximum(step - warmup_steps, 0)
        value = final_value + 0.5 * (base_value - final_value) * (
            1 + jnp.cos(jnp.pi * t / max(decay_steps, 1)))
        if warmup_steps == 0:
            return value
        ramp = warmup_start_value + (base_value - warmup_start_value) * (
            step / max(warmup_steps - 1, 1))
        return jnp.where(step < warmup_steps, ramp, value)

    return schedule


def cosine_complement_schedule(base_value: float, total_steps: int) -> Schedule:
    """1 − m for `m = cosine_schedule(base_value, 1, total_steps)`, without cancellation.

    The official code keeps the teacher momentum m in float64; in float32, m rounds to 1
    over the last ~200 steps of a long run and 1 − m formed after rounding is off by
    2.5e-2 at 99 % of it. Here `(1 − m₀)/2 · (1 + cos(πt/T))` is written as
    `(1 − m₀) · sin²(π(T − t)/(2T))`, whose argument comes from an exact integer, so
    every step is within a few float32 ulps of the float64 value, and positive.
    """
    if total_steps <= 0:
        raise ValueError(f'need total_steps ({total_steps}) > 0')
    complement = 1.0 - base_value  # in float64 at trace time

    def schedule(step):
        step = jnp.clip(jnp.asarray(step), 0, total_steps - 1)
        return complement * jnp.sin((jnp.pi / (2 * total_steps)) * (total_steps - step)) ** 2

    return schedule


def sinkhorn_reg_schedule(reg: float, reg_final: float, steps_per_epoch: int) -> Schedule:
    """ε per epoch: `linspace(reg, reg_final, 30)`, then constant `reg_final`.

    Runs shorter than 30 epochs just stop early on the ramp (the official code fails
    there, bug B4).
    """
    def schedule(step):
        epoch = jnp.minimum(jnp.asarray(step) // steps_per_epoch,
                            SINKHORN_REG_RAMP_EPOCHS - 1)
        return reg + (reg_final - reg) * epoch / (SINKHORN_REG_RAMP_EPOCHS - 1)

    return schedule


@dataclasses.dataclass(frozen=True)
class Schedules:
    """Every scheduled hyper-parameter of a run, as functions of the step."""
    learning_rate: Schedule
    weight_decay: Schedule
    # 1 − m, scheduled directly: the EMA's step size toward the student.
    one_minus_teacher_momentum: Schedule
    sinkhorn_reg: Schedule

    def __call__(self, step) -> dict[str, jnp.ndarray]:
        values = {field.name: getattr(self, field.name)(step)
                  for field in dataclasses.fields(self)}
        values['teacher_momentum'] = 1 - values['one_minus_teacher_momentum']
        return values


def make_schedules(config, steps_per_epoch: int) -> Schedules:
    """The official schedules for `config` (see `configs/`).

    The peak learning rate is the official linear scaling `lr × global_batch / 256`.
    """
    total_steps = config.epochs * steps_per_epoch
    optimizer = config.optimizer
    peak_lr = optimizer.lr * config.batch_size / 256
    return Schedules(
        learning_rate=cosine_schedule(peak_lr, optimizer.min_lr, total_steps,
                                      optimizer.warmup_epochs * steps_per_epoch),
        weight_decay=cosine_schedule(optimizer.weight_decay, optimizer.weight_decay_end,
                                     total_steps),
        one_minus_teacher_momentum=cosine_complement_schedule(config.teacher_momentum,
                                                              total_steps),
        sinkhorn_reg=sinkhorn_reg_schedule(config.loss.sinkhorn_reg,
                                           config.loss.sinkhorn_reg_final,
                                           steps_per_epoch),
    )
