"""The train state: student, EMA teacher, optimizer state, step and rng, one pytree.

Everything a resumed run needs is in the state, and nothing else is (the network and
optimizer definitions are rebuilt from the config), so it checkpoints and shards as a
plain pytree.
"""

from __future__ import annotations

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


def create_train_state(network: nn.Module, tx: optax.GradientTransformation, rng,
                       crop_shapes: Sequence[Sequence[int]], *, teacher: bool,
                       mesh: jax.sharding.Mesh | None = None,
                       abstract: bool = False) -> TrainState:
    """Initialises the student and copies it into the teacher (official init).

    `crop_shapes` gives one `[n_views, B, H, W, C]` shape per crop resolution. With a
    mesh, the state is created directly on it, replicated, with explicit shardings: a
    jitted step then compiles once instead of again after its first call. With
    `abstract`, nothing is computed or allocated: the leaves are `jax.ShapeDtypeStruct`s
    (with their shardings), enough to compile the step ahead of time for a mesh.
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
        init = jax.jit(init, out_shardings=NamedSharding(mesh, P()))
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
