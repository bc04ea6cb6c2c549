"""Mixup and CutMix with label smoothing, timm's `Mixup` on the device (fine-tuning's step).

DeiT's fine-tuning recipe, which the paper's fine-tuning follows, mixes each batch with
timm's `Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch',
label_smoothing=0.1)`. This module gives the same images and targets from the same random
numbers (tested against timm with timm's draws forced to these), jittable:

* The partner of image i is image B-1-i (timm's `x.flip(0)`).
* With probability `prob` the batch (mode 'batch'), each pair i, B-1-i ('pair') or each
  image ('elem') is mixed: CutMix with probability `switch_prob` (when both alphas are
  positive), else mixup, λ ~ Beta(α, α) of the chosen one.
* Mixup: `λ·x + (1-λ)·partner`.
* CutMix: a box of `cut_h = int(H·√(1-λ))` × `cut_w = int(W·√(1-λ))` around a uniform
  centre (cy, cx), rows `[cy - cut_h // 2, cy + (cut_h + 1) // 2)` (timm 1.0's; older
  timm made odd boxes a pixel short) and likewise columns, clipped at the borders, copied
  from the partner; with `correct_lam`, λ becomes 1 - box area / image area.
* Targets: `λ·smooth(y) + (1-λ)·smooth(partner's y)`, smoothing off value s / classes and
  on value 1 - s + s / classes.

`draw` makes the random numbers from a JAX key, `apply` is a pure function of them, so a
test can hand timm the same numbers. timm's `cutmix_minmax` box is not implemented.
timm under DDP mixes each GPU's batch: call this per device (under `shard_map`, a key per
device) for the same partners and no cross-device flip.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bam_jax.data.random_erasing import box_mask

MODES = ('batch', 'pair', 'elem')


@dataclasses.dataclass(frozen=True)
class MixupSettings:
    """timm's `Mixup` arguments; the defaults are DeiT's fine-tuning ones."""
    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = 'batch'
    correct_lam: bool = True
    label_smoothing: float = 0.1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f'mixup mode must be one of {MODES}, got {self.mode!r}.')
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            raise ValueError('mixup_alpha or cutmix_alpha must be positive.')


class MixupDraws(NamedTuple):
    """The random numbers of one batch, one row per batch / pair / image (by mode):
    timm's `rand` for applying and for switching to CutMix, its `beta` λ, and its
    `randint` box centre."""
    apply_uniform: jax.Array  # float32 [n]
    switch_uniform: jax.Array  # float32 [n]
    lam: jax.Array  # float32 [n]
    centre: jax.Array  # int32 [n, 2]: (cy, cx)


def num_draws(batch_size: int, mode: str) -> int:
    return {'batch': 1, 'pair': batch_size // 2, 'elem': batch_size}[mode]


def _use_cutmix(draws: MixupDraws, settings: MixupSettings) -> jax.Array:
    if settings.cutmix_alpha <= 0:
        return jnp.zeros_like(draws.switch_uniform, bool)
    if settings.mixup_alpha <= 0:
        return jnp.ones_like(draws.switch_uniform, bool)
    return draws.switch_uniform < settings.switch_prob


def draw(key: jax.Array, images_shape, settings: MixupSettings) -> MixupDraws:
    """The batch's random numbers for images of shape `[B, H, W, C]`."""
    batch_size, height, width = images_shape[:3]
    if batch_size % 2:
        raise ValueError(f'mixup needs an even batch (timm asserts it), got {batch_size}.')
    n = num_draws(batch_size, settings.mode)
    apply_key, switch_key, lam_key, y_key, x_key = jax.random.split(key, 5)
    switch = jax.random.uniform(switch_key, (n,))
    partial = MixupDraws(jax.random.uniform(apply_key, (n,)), switch, None, None)
    alpha = jnp.where(_use_cutmix(partial, settings), settings.cutmix_alpha,
                      settings.mixup_alpha)
    centre = jnp.stack([jax.random.randint(y_key, (n,), 0, height),
                        jax.random.randint(x_key, (n,), 0, width)], axis=1)
    return partial._replace(lam=jax.random.beta(lam_key, alpha, alpha),
                            centre=centre.astype(jnp.int32))


def cutmix_box(lam: jax.Array, centre: jax.Array, height: int, width: int):
    """timm's `rand_bbox`: (top, bottom, left, right) of the box for λ around `centre`."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = (height * ratio).astype(jnp.int32)
    cut_w = (width * ratio).astype(jnp.int32)
    cy, cx = centre[..., 0], centre[..., 1]
    return (jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height),
            jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width))


def per_image(draws: MixupDraws, settings: MixupSettings, batch_size: int):
    """Per image `[B]`: whether it is mixed, whether by CutMix, λ and box centre."""
    mixed = draws.apply_uniform < settings.prob
    values = (mixed, _use_cutmix(draws, settings), jnp.where(mixed, draws.lam, 1.0),
              draws.centre)
    if settings.mode == 'batch':
        return tuple(jnp.broadcast_to(v, (batch_size,) + v.shape[1:]) for v in values)
    if settings.mode == 'pair':  # image B-1-i takes pair i's numbers
        return tuple(jnp.concatenate([v, v[::-1]]) for v in values)
    return values


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    off = smoothing / num_classes
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), 1.0 - smoothing + off,
                     off).astype(jnp.float32)


def apply(images: jax.Array, labels: jax.Array, draws: MixupDraws,
          settings: MixupSettings) -> tuple[jax.Array, jax.Array]:
    """Float images `[B, H, W, C]` and int labels `[B]` → mixed images and soft targets
    `[B, num_classes]` (float32), for the numbers in `draws`."""
    batch_size, height, width = images.shape[:3]
    mixed, cutmix, lam, centre = per_image(draws, settings, batch_size)
    partner = images[::-1]
    top, bottom, left, right = cutmix_box(lam, centre, height, width)
    inside = box_mask(top, bottom, left, right, height, width)
    if settings.correct_lam:
        box_lam = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    else:
        box_lam = lam
    weight = lam[:, None, None, None].astype(images.dtype)
    blended = images * weight + partner * (1 - weight)
    cut = jnp.where(inside, partner, images)
    out = jnp.where(cutmix[:, None, None, None], cut, blended)
    out = jnp.where(mixed[:, None, None, None], out, images)
    lam = jnp.where(mixed & cutmix, box_lam, lam)[:, None]
    targets = smooth_targets(labels, settings.num_classes, settings.label_smoothing)
    return out, targets * lam + targets[::-1] * (1 - lam)


def mixup(images: jax.Array, labels: jax.Array, key: jax.Array,
          settings: MixupSettings) -> tuple[jax.Array, jax.Array]:
    """`apply` with numbers drawn from `key`: the function a train step calls."""
    return apply(images, labels, draw(key, images.shape, settings), settings)
