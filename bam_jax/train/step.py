"""One BAM training step: forward student and teacher, loss, update, EMA.

Order within a step, as in the official loop: schedules at the current step → student
and teacher forward on the same crops (the teacher in train mode, as the official
teacher is) → BAM loss → clipped AdamW/LARS update → EMA of the teacher toward the
updated student.

The official code performs the EMA at the start of the *next* iteration's forward with
momentum `m[t+1]`; doing it at the end of step `t` with `m[t+1]` gives the teacher the
exact same sequence of values and keeps the state self-contained.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax.loss import bam_loss
from bam_jax.models.vit import is_frozen
from bam_jax.train.schedules import Schedules
from bam_jax.train.state import TrainState, gathered

CROP_GROUPS = ('global', 'local')
# Folded into the state's rng for the device augmentations; each image then folds in its
# own host-drawn seed, so the stream differs per image and per epoch, not per device.
AUGMENT_STREAM = 0x61756720


def batch_crops(batch: dict[str, jax.Array]) -> list[jax.Array]:
    """The crop groups of a batch, global first: the loss's crop order."""
    return [batch[group] for group in CROP_GROUPS if batch.get(group) is not None]


def ema(teacher, student, one_minus_momentum):
    """θ_t ← m·θ_t + (1 − m)·θ_s as θ_t + (1 − m)(θ_s − θ_t); frozen leaves are left
    bit-identical.

    Written with 1 − m, never m: m rounds to 1 in float32 near the end of a run (the
    official code keeps it in float64), while 1 − m stays exact and positive.
    """
    def update(path, teacher_leaf, student_leaf):
        if is_frozen(path):
            return teacher_leaf
        return teacher_leaf + one_minus_momentum * (student_leaf - teacher_leaf)
    return jax.tree_util.tree_map_with_path(update, teacher, student)


# XLA:CPU hands matmuls to the YNNPACK library, and by default reductions and element-wise
# chains too; those library fusions cannot take their producers in, so their inputs are
# written out: the step's temporaries are 1.59 GiB instead of 1.24 for issue 15's tiny
# ViT (0.25 instead of 0.21 for the MNIST default), for no measurable speed
# (docs/performance.md). Matmuls alone go to YNNPACK here; XLA fuses the rest itself.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def make_train_step(network: nn.Module, tx: optax.GradientTransformation,
                    schedules: Schedules, loss_kwargs: dict[str, Any], *,
                    mesh: jax.sharding.Mesh, axis_name: str = 'data',
                    augment: Callable[[dict, jax.Array], dict] | None = None,
                    state_sharding: TrainState | None = None,
                    donate: bool = True) -> Callable[[TrainState, dict], tuple]:
    """The jitted step `(state, batch) -> (state, metrics)`.

    `batch` maps 'global' (and 'local', if any) to crops `[n_views, B, H, W, C]`,
    sharded over `axis_name` on the image axis (see `shard_batch`). Host batches hold
    uint8 crops and a per-image 'seed' `[B, 2]`; `augment(batch, rng)` (the device half
    of the augmentations) turns them into normalised float crops inside the step. Float
    crops are used as they are. The state is donated and keeps its layout:
    `state_sharding` (see `bam_jax.train.state.state_sharding`; default replicated).
    A sharded state's parameters are gathered where the networks use them, and the
    gradients reduced straight into their shards. `loss_kwargs` are `bam_loss`'s static
    arguments (all but ε, which is scheduled). On the CPU it compiles with
    `CPU_COMPILER_OPTIONS`.
    """
    loss_fn = functools.partial(bam_loss, mesh=mesh, axis_name=axis_name, **loss_kwargs)
    replicated = NamedSharding(mesh, P())
    state_sharding = replicated if state_sharding is None else state_sharding
    params_sharding = getattr(state_sharding, 'params', replicated)

    def forward(params, batch_stats, crops, rng):
        params = gathered(params, mesh)
        variables = {'params': params, 'batch_stats': batch_stats}
        return network.apply(variables, crops, train=True, rngs={'dropout': rng},
                             mutable=['batch_stats'])

    def train_step(state: TrainState, batch):
        if batch['global'].dtype == jnp.uint8:
            if augment is None:
                raise ValueError('uint8 crops need the device augmentations: pass augment.')
            batch = augment(batch, jax.random.fold_in(state.rng, AUGMENT_STREAM))
        crops = batch_crops(batch)
        hyper = schedules(state.step)
        student_rng, teacher_rng = jax.random.split(jax.random.fold_in(state.rng,
                                                                       state.step))
        has_teacher = state.teacher_params is not None
        teacher_batch_stats = state.teacher_batch_stats
        z_teacher = None
        if has_teacher:
            z_teacher, teacher_updates = forward(state.teacher_params,
                                                 state.teacher_batch_stats, crops,
                                                 teacher_rng)
            z_teacher = jax.lax.stop_gradient(z_teacher)
            teacher_batch_stats = teacher_updates.get('batch_stats', {})

        def objective(params):
            z_student, updates = forward(params, state.batch_stats, crops, student_rng)
            loss, metrics = loss_fn(z_student, z_teacher,
                                    sinkhorn_reg=hyper['sinkhorn_reg'])
            return loss, (metrics, updates.get('batch_stats', {}))

        (loss, (metrics, batch_stats)), grads = jax.value_and_grad(
            objective, has_aux=True)(state.params)
        # Sharded: each device's gradient shard is reduced there (a reduce-scatter).
        grads = jax.lax.with_sharding_constraint(grads, params_sharding)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_step = state.step + 1
        # The EMA ending step t uses m[t+1] (see the module docstring); log that one,
        # both m and the 1 − m that the EMA uses (m alone reads 1.0 near the end).
        hyper['one_minus_teacher_momentum'] = schedules.one_minus_teacher_momentum(new_step)
        hyper['teacher_momentum'] = 1 - hyper['one_minus_teacher_momentum']
        teacher_params = None
        if has_teacher:
            teacher_params = ema(state.teacher_params, params,
                                 hyper['one_minus_teacher_momentum'])
        new_state = state.replace(
            step=new_step, params=params, batch_stats=batch_stats,
            teacher_params=teacher_params, teacher_batch_stats=teacher_batch_stats,
            opt_state=opt_state)
        metrics = {'loss': loss, **metrics, **hyper,
                   'grad_norm': optax.tree.norm(grads),
                   'update_norm': optax.tree.norm(updates),
                   'param_norm': optax.tree.norm(params)}
        return new_state, metrics

    # The batch keeps the sharding it was placed with (`shard_batch`).
    on_cpu = mesh.devices.flat[0].platform == 'cpu'
    return jax.jit(train_step, in_shardings=(state_sharding, None),
                   out_shardings=(state_sharding, replicated),
                   donate_argnums=(0,) if donate else (),
                   compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None)


def batch_sharding(mesh: jax.sharding.Mesh, key: str, axis_name: str = 'data'):
    """Crops `[n_views, B, ...]` are split on their image axis, the rest on axis 0."""
    spec = P(None, axis_name) if key in CROP_GROUPS else P(axis_name)
    return NamedSharding(mesh, spec)


def shard_batch(batch: dict, mesh: jax.sharding.Mesh, axis_name: str = 'data') -> dict:
    """This process's host batch → global arrays over `mesh` (each process its own slice)."""
    return {key: jax.make_array_from_process_local_data(
                batch_sharding(mesh, key, axis_name), value)
            for key, value in batch.items()}


def loss_kwargs_from_config(config) -> dict[str, Any]:
    """`bam_loss`'s static arguments from a run config."""
    loss = config.loss
    return dict(n_global_crops=config.crops.n_global, n_target_crops=loss.n_target_crops,
                temperature=loss.temperature, sinkhorn_iters=loss.sinkhorn_iters,
                top_k=loss.top_k, positive_masking=loss.positive_masking)
