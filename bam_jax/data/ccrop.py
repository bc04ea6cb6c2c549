"""ContrastiveCrop boxes (official §5.2): where the last attention block looks.

The host crops (`crops.sample_crop_box(box=...)`) place crop centres inside one box per
dataset image; this module computes the boxes from attention maps and says when to.
"""

import jax
import jax.numpy as jnp
import numpy as np


def initial_boxes(num_images: int) -> np.ndarray:
    """Every box is the whole image, `[h_min, w_min, h_max, w_max]` in fractions."""
    return np.tile(np.asarray([0.0, 0.0, 1.0, 1.0], np.float32), (num_images, 1))


def upsampled_maps(maps: jax.Array, image_size: int) -> jax.Array:
    """Maps `[N, h, w]` each shifted to a minimum of 0, divided by its maximum + 1e-5 and
    upsampled bilinearly (half-pixel centres, torch's align_corners=False) to
    `[N, image_size, image_size]`: the official ContrastiveCrop heat map, in [0, 1)."""
    maps = maps - jnp.min(maps, axis=(1, 2), keepdims=True)
    maps = maps / (jnp.max(maps, axis=(1, 2), keepdims=True) + 1e-5)
    return jax.image.resize(maps, (maps.shape[0], image_size, image_size), 'bilinear',
                            antialias=False)


def boxes_from_maps(maps: jax.Array, image_size: int = 224,
                    threshold: float = 0.1) -> jax.Array:
    """Boxes `[N, 4]` from attention maps `[N, h, w]` over a grid of the image.

    The box spans the first to last row and column of the `upsampled_maps` whose maximum
    exceeds `threshold`, as fractions of the size.
    """
    maps = upsampled_maps(maps, image_size)

    def span(above):  # [N, image_size] booleans → first and last True
        positions = jnp.arange(image_size)
        first = jnp.min(jnp.where(above, positions, image_size - 1), axis=1)
        last = jnp.max(jnp.where(above, positions, 0), axis=1)
        return first, last

    row_min, row_max = span(jnp.max(maps, axis=2) > threshold)
    column_min, column_max = span(jnp.max(maps, axis=1) > threshold)
    return jnp.stack([row_min, column_min, row_max, column_max], axis=1) / image_size


def cls_attention_maps(attention: jax.Array) -> jax.Array:
    """A ViT's last-block attention `[N, heads, 1 + P, 1 + P]` → the CLS query's attention
    to the P patch keys on the square patch grid, `[N, heads, side, side]`."""
    cls_to_patches = attention[:, :, 0, 1:]
    side = int(round(cls_to_patches.shape[-1] ** 0.5))
    return cls_to_patches.reshape(cls_to_patches.shape[:2] + (side, side))


def boxes_from_attention(attention: jax.Array, image_size: int = 224,
                         threshold: float = 0.1) -> jax.Array:
    """Boxes `[N, 4]` from a ViT's last-block attention `[N, heads, 1 + P, 1 + P]`: the
    CLS attention maps summed over heads (`boxes_from_maps`)."""
    return boxes_from_maps(jnp.sum(cls_attention_maps(attention), axis=1), image_size,
                           threshold)


def model_attention_maps(model, variables, images: jax.Array) -> jax.Array:
    """Per-head maps `[N, heads, h, w]` float32 of the last attention block from a
    backbone's `encode`: a ViT's `cls_attention_maps`, or a CAFormer's `attention_map`
    (the last attention block's, averaged over its queries, as the official
    `get_selfattention` meant; bug B7)."""
    features = model.apply(variables, images, return_attention=True, method=model.encode)
    if 'attention_map' in features:
        return features['attention_map'].astype(jnp.float32)
    return cls_attention_maps(features['attention'].astype(jnp.float32))


def model_boxes(model, variables, images: jax.Array, threshold: float = 0.1) -> jax.Array:
    """Boxes for normalised, square-resized images `[N, S, S, 3]` from a backbone's last
    attention block: its `model_attention_maps` summed over heads.

    Jit it and shard `images` over the image axis; every op is per image.
    """
    maps = jnp.sum(model_attention_maps(model, variables, images), axis=1)
    return boxes_from_maps(maps, images.shape[1], threshold)


def update_boxes_after(epoch: int, num_epochs: int, warmup_epochs: int,
                       loc_interval: int) -> bool:
    """Official schedule: recompute after epoch `epoch` (0-based, as the official loop)."""
    return epoch >= warmup_epochs and epoch % loc_interval == 0 and epoch != num_epochs - 1


def use_boxes_in(epoch: int, warmup_epochs: int, loc_interval: int) -> bool:
    """Crops follow the boxes from epoch max(loc_interval, warmup_epochs) + 1 on."""
    return epoch >= max(loc_interval, warmup_epochs) + 1
