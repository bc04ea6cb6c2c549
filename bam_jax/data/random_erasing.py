"""Random erasing, timm's `RandomErasing` on the device (fine-tuning's input).

DeiT's recipe erases, with probability 0.25 per image, one rectangle of the normalised
image and fills it with per-pixel N(0, 1) noise (`--reprob 0.25 --remode pixel
--recount 1`). timm, per image: if `random() > probability` nothing; else up to 10
attempts, each drawing an area fraction ~ U(min_area, max_area) and a log aspect ratio ~
U(log r, -log r), `h = round(√(area·aspect))`, `w = round(√(area / aspect))` (Python's
round: half to even); the first attempt with h < H and w < W places its top-left corner
uniformly (`randint(0, H - h)`, both ends included) and is erased; if none fits,
nothing is.

Here the 10 attempts are drawn at once and the first that fits is picked with a mask, so
the op is a fixed computation, jittable and vmapped over images. `draw` makes the random
numbers (the noise included) from a JAX key and `apply` is a pure function of them, so a
test hands timm the same numbers (tested). Modes: 'pixel' (DeiT's), 'rand' (one normal
colour per box), 'const' (zeros); one box per image (timm's count 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

ATTEMPTS = 10  # timm's
MODES = ('pixel', 'rand', 'const')


@dataclasses.dataclass(frozen=True)
class ErasingSettings:
    """timm's `RandomErasing` arguments; the defaults are DeiT's fine-tuning ones."""
    probability: float = 0.25
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    mode: str = 'pixel'

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f'random erasing mode must be one of {MODES}, got '
                             f'{self.mode!r}.')

    @property
    def log_aspect(self) -> tuple[float, float]:
        return math.log(self.min_aspect), math.log(1 / self.min_aspect)


class ErasingDraws(NamedTuple):
    """The random numbers per image, as timm draws them: `random()` to erase, per
    attempt `uniform(min_area, max_area)` and `uniform(*log_aspect)`, the uniforms
    behind the corner's `randint`s, and the fill (`[B, H, W, C]` for 'pixel', `[B, 1, 1,
    C]` for 'rand', zeros for 'const')."""
    erase_uniform: jax.Array  # float32 [B]
    area: jax.Array  # float32 [B, ATTEMPTS], fraction of the image
    log_aspect: jax.Array  # float32 [B, ATTEMPTS]
    corner_uniform: jax.Array  # float32 [B, 2]: top, left
    fill: jax.Array


def draw(key: jax.Array, images_shape, settings: ErasingSettings) -> ErasingDraws:
    """The random numbers for float images of shape `[B, H, W, C]`."""
    batch, height, width, channels = images_shape
    keys = jax.random.split(key, 5)
    fill_shape = {'pixel': (batch, height, width, channels),
                  'rand': (batch, 1, 1, channels), 'const': (batch, 1, 1, channels)}
    fill = (jnp.zeros(fill_shape['const']) if settings.mode == 'const'
            else jax.random.normal(keys[4], fill_shape[settings.mode]))
    return ErasingDraws(
        jax.random.uniform(keys[0], (batch,)),
        jax.random.uniform(keys[1], (batch, ATTEMPTS), minval=settings.min_area,
                           maxval=settings.max_area),
        jax.random.uniform(keys[2], (batch, ATTEMPTS), minval=settings.log_aspect[0],
                           maxval=settings.log_aspect[1]),
        jax.random.uniform(keys[3], (batch, 2)), fill)


def boxes(draws: ErasingDraws, height: int, width: int, settings: ErasingSettings):
    """Per image `[B]`: whether a box is erased, and its top, left, h, w (int32)."""
    target = draws.area * (height * width)
    aspect = jnp.exp(draws.log_aspect)
    h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (w < width) & (h < height)
    first = jnp.argmax(fits, axis=1)  # the first attempt that fits
    h, w = (jnp.take_along_axis(v, first[:, None], axis=1)[:, 0] for v in (h, w))
    erase = (draws.erase_uniform <= settings.probability) & jnp.any(fits, axis=1)
    top = (draws.corner_uniform[:, 0] * (height - h + 1)).astype(jnp.int32)
    left = (draws.corner_uniform[:, 1] * (width - w + 1)).astype(jnp.int32)
    return erase, top, left, h, w


def box_mask(top, bottom, left, right, height: int, width: int) -> jax.Array:
    """`[B, H, W, 1]`: True inside each image's box, rows [top, bottom) and columns
    [left, right) (`[B]` each)."""
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    top, bottom, left, right = (v[:, None, None] for v in (top, bottom, left, right))
    return ((rows >= top) & (rows < bottom) & (cols >= left) & (cols < right))[..., None]


def apply(images: jax.Array, draws: ErasingDraws, settings: ErasingSettings) -> jax.Array:
    """Normalised float images `[B, H, W, C]` with their boxes erased."""
    _, height, width, _ = images.shape
    erase, top, left, h, w = boxes(draws, height, width, settings)
    inside = box_mask(top, top + h, left, left + w, height, width)
    return jnp.where(inside & erase[:, None, None, None], draws.fill.astype(images.dtype),
                     images)


def random_erasing(images: jax.Array, key: jax.Array,
                   settings: ErasingSettings = ErasingSettings()) -> jax.Array:
    """`apply` with numbers drawn from `key`: the function a train step calls."""
    return apply(images, draw(key, images.shape, settings), settings)
