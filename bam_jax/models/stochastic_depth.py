"""Stochastic depth (drop path), shared by every backbone, and timm's rate schedules.

A residual branch is dropped per sample with probability `rate`, and kept ones are scaled
by 1/keep, as timm's `DropPath`: the expected output is the branch itself, so evaluation
uses it unchanged. Pretraining runs at rate 0 (the official scripts' `--drop_path_rate 0`),
which takes no random numbers: its outputs and the other modules' rngs do not change.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

RNG_NAME = 'dropout'


def drop_path(module: nn.Module, branch: jax.Array, rate: float, train: bool) -> jax.Array:
    """`branch` with whole samples zeroed at `rate`, the rest scaled by 1/(1 - rate).

    Active only in training with an rng named 'dropout' passed to `apply`; the mask comes
    from `module.make_rng('dropout')`, so it differs per block.
    """
    if not train or rate == 0.0 or not module.has_rng(RNG_NAME):
        return branch
    keep_prob = 1.0 - rate
    mask_shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
    keep = keep_mask(module.make_rng(RNG_NAME), keep_prob, mask_shape)
    return jnp.where(keep, branch / keep_prob, jnp.zeros_like(branch))


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    """Which samples keep the branch (True with probability `keep_prob`); the tests
    replace it to hand timm and this module the same masks."""
    return jax.random.bernoulli(key, keep_prob, shape)


def linear_rates(rate: float, depth: int) -> list[float]:
    """Per-block rates rising linearly from 0 to `rate` over all blocks: timm's ResNet
    rule `rate · i / (depth - 1)` exactly, and its ViT and MetaFormer `torch.linspace`
    (float32) to float32 rounding."""
    return [rate * index / max(depth - 1, 1) for index in range(depth)]


def stage_rates(rate: float, stage_depths: Sequence[int]) -> list[list[float]]:
    """`linear_rates` over the blocks of every stage, split per stage."""
    rates = linear_rates(rate, sum(stage_depths))
    bounds = np.cumsum([0, *stage_depths])
    return [rates[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
