"""From a run config to the network, optimizer, schedules, state and jitted step."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import flax.linen as nn
import jax
import optax

from bam_jax.data.augment import augment_crops
from bam_jax.models import multicrop
from bam_jax.models.multicrop import build_network
from bam_jax.models.vit import is_frozen
from bam_jax.train.optimizer import make_optimizer
from bam_jax.train.schedules import Schedules, make_schedules
from bam_jax.train.state import TrainState, create_train_state, state_sharding
from bam_jax.train.step import loss_kwargs_from_config, make_train_step


# Backbones whose `encode` gives the attention maps ContrastiveCrop boxes come from.
ATTENTION_BACKBONES = ('vit', 'caformer_m36')


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and how to fix it."""


def validate_config(config, device_count: int):
    """Checks the values that would otherwise fail deep inside a jitted step."""
    def need(condition: bool, message: str):
        if not condition:
            raise ConfigError(message)
    need(config.epochs >= 1, f'config.epochs={config.epochs}: train at least one epoch.')
    need(config.optimizer.warmup_epochs >= 0,
         f'config.optimizer.warmup_epochs={config.optimizer.warmup_epochs} must be >= 0.')
    need(config.batch_size >= 1,
         f'config.batch_size={config.batch_size}: the global batch needs at least one '
         f'image per device ({device_count}).')
    need(config.batch_size % device_count == 0,
         f'config.batch_size={config.batch_size} is not divisible by the {device_count} '
         'devices; use a multiple.')
    need(config.optimizer.name in ('adamw', 'lars'),
         f"config.optimizer.name={config.optimizer.name!r}: expected 'adamw' or 'lars'.")
    need(config.loss.n_target_crops <= config.crops.n_global,
         f'config.loss.n_target_crops={config.loss.n_target_crops} exceeds '
         f'config.crops.n_global={config.crops.n_global}.')
    need(config.loss.top_k >= 0,
         f'config.loss.top_k={config.loss.top_k}: use 0 (every column) or a positive k.')
    need(config.loss.top_k < config.batch_size * config.crops.n_global,
         f'config.loss.top_k={config.loss.top_k} must be below the number of target '
         f'columns, batch_size × n_global = {config.batch_size * config.crops.n_global}.')
    for resolve in (multicrop.compute_dtype, multicrop.attention_implementation):
        try:  # names the key and the choices; any platform will do for the check
            resolve(config, 'cpu')
        except ValueError as error:
            raise ConfigError(str(error)) from None
    need(not config.data.get('ccrop') or config.model.name in ATTENTION_BACKBONES,
         f'config.data.ccrop=True needs attention maps, which the {config.model.name!r} '
         f'backbone has none of; set config.data.ccrop=False or use one of '
         f'{list(ATTENTION_BACKBONES)}.')


def clamp_warmup(config):
    """A warm-up longer than the run becomes the whole run (so `--config.epochs=1` works
    on every config's schedule), said in one line."""
    if config.optimizer.warmup_epochs > config.epochs:
        logging.info('config.optimizer.warmup_epochs=%s is longer than the run '
                     '(config.epochs=%d): the warm-up is the whole run.',
                     config.optimizer.warmup_epochs, config.epochs)
        config.optimizer.warmup_epochs = config.epochs


def frozen_mask(params):
    """True for the leaves frozen at initialisation (patch projection, position table)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_frozen(path), params)


def crop_shapes(config, batch_size: int) -> list[tuple[int, ...]]:
    """`[n_views, B, H, W, 3]` per crop resolution, global first (`batch_crops` order)."""
    crops = config.crops
    shapes = [(crops.n_global, batch_size, crops.global_size, crops.global_size, 3)]
    if crops.n_local:
        shapes.append((crops.n_local, batch_size, crops.local_size, crops.local_size, 3))
    return shapes


@dataclasses.dataclass(frozen=True)
class Training:
    network: nn.Module
    tx: optax.GradientTransformation
    schedules: Schedules
    state: TrainState
    train_step: Callable


def build_training(config, mesh: jax.sharding.Mesh, steps_per_epoch: int,
                   rng: jax.Array | None = None, *, abstract: bool = False) -> Training:
    """Everything a run needs; the state is placed on `mesh`, replicated or (with
    `config.shard_state`) sharded.

    With `abstract`, the state is shapes and shardings only (see `create_train_state`).
    """
    network = build_network(config, platform=mesh.devices.flat[0].platform)
    schedules = make_schedules(config, steps_per_epoch)
    optimizer = config.optimizer
    tx = make_optimizer(
        optimizer.name, schedules.learning_rate, schedules.weight_decay,
        frozen=frozen_mask, clip_grad=optimizer.clip_grad, b1=optimizer.b1,
        b2=optimizer.b2, eps=optimizer.eps, lars_momentum=optimizer.lars_momentum,
        lars_eta=optimizer.lars_eta)
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    shard = config.get('shard_state', False)  # absent from configs saved before it
    state = create_train_state(network, tx, rng, crop_shapes(config, 2),
                               teacher=config.teacher, mesh=mesh, shard=shard,
                               abstract=abstract)
    train_step = make_train_step(
        network, tx, schedules, loss_kwargs_from_config(config), mesh=mesh,
        augment=lambda batch, rng: augment_crops(batch, config.crops, rng),
        state_sharding=state_sharding(state, mesh, shard=shard))
    return Training(network, tx, schedules, state, train_step)
