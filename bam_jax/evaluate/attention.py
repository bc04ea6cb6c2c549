"""Last-block self-attention maps of a backbone, and PNGs showing them.

As the DINO and UDI visualisers: for a ViT, the CLS query's attention to the patches
in the last block, one map per head over the patch grid; for a CAFormer, its last
attention block's `attention_map` (the attention averaged over the queries, per head;
it has no CLS token). A ResNet has no attention and is refused.

Each PNG is one image: the input, then every head's map, then the mean over heads,
`PANELS_PER_ROW` panels of `image_size` pixels to a row. Each map is min-max scaled and
upsampled bilinearly as ContrastiveCrop's heat maps (`ccrop.upsampled_maps`) and
coloured with a viridis-like colormap. The PNGs are written to a temporary directory
next to `out_dir` and moved into it only once all are written.
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from bam_jax.data import ccrop
from bam_jax.evaluate.features import normalize_images
from bam_jax.models.caformer import CAFormer
from bam_jax.models.vit import VisionTransformer

PANELS_PER_ROW = 8
IMAGES_PER_STEP = 16
# Colormap anchors, dark blue-violet → teal → yellow (sampled from viridis).
_COLORMAP = np.asarray([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                        [253, 231, 37]], np.float64)


def check_backbone(backbone) -> None:
    """ValueError unless the backbone has self-attention maps (ViT, CAFormer)."""
    if not isinstance(backbone, (VisionTransformer, CAFormer)):
        raise ValueError(f'Attention maps need a ViT or CAFormer backbone; '
                         f'{type(backbone).__name__} has no self-attention.')


def attention_maps(backbone, variables, images: jax.Array) -> jax.Array:
    """Per-head last-block attention maps `[N, heads, h, w]` over the patch grid of
    normalised images `[N, S, S, 3]` (float32; a ViT's sum over the grid is the CLS
    attention to the patches, a CAFormer's is 1). Pure: jit it with the backbone bound."""
    check_backbone(backbone)
    return ccrop.model_attention_maps(backbone, variables, images)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] `[...]` → uint8 RGB `[..., 3]`, interpolated between anchors."""
    positions = np.clip(values, 0.0, 1.0) * (len(_COLORMAP) - 1)
    anchors = np.arange(len(_COLORMAP))
    channels = [np.interp(positions, anchors, _COLORMAP[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


@functools.partial(jax.jit, static_argnames=('backbone', 'image_size'))
def _panels(backbone, variables, images, *, image_size):
    """uint8 images → heat maps in [0, 1] `[N, heads + 1, S, S]` (the heads, then their
    mean)."""
    maps = attention_maps(backbone, variables, normalize_images(images))
    maps = jnp.concatenate([maps, jnp.mean(maps, axis=1, keepdims=True)], axis=1)
    n_images, n_maps = maps.shape[:2]
    return ccrop.upsampled_maps(maps.reshape((-1,) + maps.shape[2:]), image_size).reshape(
        n_images, n_maps, image_size, image_size)


def _grid(panels: list[np.ndarray]) -> np.ndarray:
    """`[S, S, 3]` uint8 panels → one picture, left to right, `PANELS_PER_ROW` a row,
    white where the last row ends early."""
    size = panels[0].shape[0]
    columns = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // columns)
    picture = np.full((rows * size, columns * size, 3), 255, np.uint8)
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        picture[row * size:(row + 1) * size, column * size:(column + 1) * size] = panel
    return picture


def _resized(images: np.ndarray, image_size: int) -> np.ndarray:
    if images.shape[1:3] == (image_size, image_size):
        return images
    return np.stack([np.asarray(Image.fromarray(image).resize(
        (image_size, image_size), Image.Resampling.BICUBIC)) for image in images])


def save_attention_maps(backbone, variables, images_uint8, out_dir, *,
                        image_size: int) -> list[pathlib.Path]:
    """One PNG per image, `attention_00000.png`… in `out_dir`, of the input squashed to
    `image_size` and its attention maps (module docstring); returns their paths.

    Args:
      backbone: a `VisionTransformer` or `CAFormer`; `variables` its variables.
      images_uint8: `[N, H, W, 3]` uint8 RGB; resized (bicubic) to `image_size` square,
        which must suit the backbone (a multiple of the ViT's patch size).
      out_dir: created if missing; files of the same names are replaced.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or (
            not len(images)):
        raise ValueError(f'images_uint8 must be uint8 [N, H, W, 3] with N ≥ 1; got '
                         f'{images.dtype} {images.shape}.')
    check_backbone(backbone)
    images = _resized(images, image_size)
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'out_dir {out_dir} exists and is not a directory.')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}-', dir=out_dir.parent))
    try:
        names = []
        for start in range(0, len(images), IMAGES_PER_STEP):
            chunk = images[start:start + IMAGES_PER_STEP]
            maps = np.asarray(_panels(backbone, variables, jnp.asarray(chunk),
                                      image_size=image_size))
            for offset, (image, image_maps) in enumerate(zip(chunk, maps)):
                name = f'attention_{start + offset:05d}.png'
                Image.fromarray(_grid([image] + list(colormap(image_maps)))).save(
                    staging / name)
                names.append(name)
        out_dir.mkdir(exist_ok=True)
        for name in names:
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / name for name in names]
