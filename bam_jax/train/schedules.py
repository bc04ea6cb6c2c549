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
    teacher_momentum: Schedule
    sinkhorn_reg: Schedule

    def __call__(self, step) -> dict[str, jnp.ndarray]:
        return {field.name: getattr(self, field.name)(step)
                for field in dataclasses.fields(self)}


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
        teacher_momentum=cosine_schedule(config.teacher_momentum, 1.0, total_steps),
        sinkhorn_reg=sinkhorn_reg_schedule(config.loss.sinkhorn_reg,
                                           config.loss.sinkhorn_reg_final,
                                           steps_per_epoch),
    )
