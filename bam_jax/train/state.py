"""The train state: student, EMA teacher, optimizer state, step and rng, one pytree.

Everything a resumed run needs is in the state, and nothing else is (the network and
optimizer definitions are rebuilt from the config), so it checkpoints and shards as a
plain pytree.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    # The teacher has the student's architecture and is updated only by EMA. Its BN
    # statistics are its own (the official EMA skips buffers). None without a teacher.
    teacher_params: Any
    teacher_batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array


# A sharded state leaves smaller leaves replicated (4 KiB in float32): gathering them
# would cost more in latency than their copies cost in memory.
MIN_SHARDED_SIZE = 2 ** 10


def fsdp_sharding(shape: Sequence[int], mesh: jax.sharding.Mesh,
                  axis_name: str = 'data') -> NamedSharding:
    """One leaf split over `axis_name` along its first dimension that the axis divides;
    replicated if it is small or no dimension divides.

    The first (major) dimension, not the largest: its shards are contiguous, gathered
    without a transpose, and on a TPU, which pads the two minor dimensions of every
    array to its (8, 128) tiles, a [384, 1536] kernel split 64 ways is [6, 1536] per
    chip (padded by 1.3×), where a split of the minor one would give [384, 24] (5.3×).
    """
    n = mesh.shape[axis_name]
    divisible = [dim for dim, size in enumerate(shape) if size % n == 0]
    if n == 1 or math.prod(shape) < MIN_SHARDED_SIZE or not divisible:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(*(axis_name if d == divisible[0] else None
                                   for d in range(len(shape)))))


def state_sharding(state: TrainState, mesh: jax.sharding.Mesh, *, shard: bool,
                   axis_name: str = 'data') -> TrainState:
    """The sharding of every leaf of `state` (real or abstract): all replicated, or with
    `shard` (FSDP) the student, teacher and optimizer state split by `fsdp_sharding`.

    Sharded, each device holds 1/n of the four copies of every large parameter (student,
    teacher, two AdamW moments); the step gathers the parameters where the networks use
    them. BN statistics, step and rng are small and stay replicated.
    """
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, state)
    if not shard:
        return shardings

    def split(tree):
        return jax.tree.map(lambda leaf: fsdp_sharding(leaf.shape, mesh, axis_name), tree)
    return shardings.replace(params=split(state.params),
                             teacher_params=split(state.teacher_params),
                             opt_state=split(state.opt_state))


def gathered(tree, mesh: jax.sharding.Mesh):
    """Inside a jit: `tree` whole on every device. Where a sharded state's parameters
    are used, XLA all-gathers them here (a no-op for a replicated state)."""
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


def create_train_state(network: nn.Module, tx: optax.GradientTransformation, rng,
                       crop_shapes: Sequence[Sequence[int]], *, teacher: bool,
                       mesh: jax.sharding.Mesh | None = None, shard: bool = False,
                       abstract: bool = False) -> TrainState:
    """Initialises the student and copies it into the teacher (official init).

    `crop_shapes` gives one `[n_views, B, H, W, C]` shape per crop resolution. With a
    mesh, the state is created directly on it, replicated (or with `shard`, sharded as
    `state_sharding` says), with explicit shardings: a jitted step then compiles once
    instead of again after its first call. With `abstract`, nothing is computed or
    allocated: the leaves are `jax.ShapeDtypeStruct`s (with their shardings), enough to
    compile the step ahead of time for a mesh.
    """
    init_rng, state_rng = jax.random.split(rng)

    def init():
        crops = [jnp.zeros(shape, jnp.float32) for shape in crop_shapes]
        variables = network.init({'params': init_rng, 'dropout': init_rng}, crops,
                                 train=False)
        params = variables['params']
        batch_stats = variables.get('batch_stats', {})
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
            teacher_params=params if teacher else None,
            teacher_batch_stats=batch_stats if teacher else None,
            opt_state=tx.init(params), rng=state_rng)

    if mesh is None:
        init = jax.jit(init)
    else:
        init = jax.jit(init, out_shardings=state_sharding(jax.eval_shape(init), mesh,
                                                          shard=shard))
    return jax.eval_shape(init) if abstract else init()


def backbone_variables(state: TrainState, weights: str) -> dict[str, Any]:
    """The backbone's {'params'[, 'batch_stats']} of the 'student' or the EMA 'teacher'
    (ValueError if the run has no teacher): what evaluation and export apply."""
    if weights == 'teacher':
        if state.teacher_params is None:
            raise ValueError("this run has no teacher (config.teacher=False)")
        params, stats = state.teacher_params, state.teacher_batch_stats
    elif weights == 'student':
        params, stats = state.params, state.batch_stats
    else:
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    variables = {'params': params['backbone']}
    if stats and stats.get('backbone'):
        variables['batch_stats'] = stats['backbone']
    return variables


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
