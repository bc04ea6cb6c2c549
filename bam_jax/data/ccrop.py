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


def boxes_from_maps(maps: jax.Array, image_size: int = 224,
                    threshold: float = 0.1) -> jax.Array:
    """Boxes `[N, 4]` from attention maps `[N, h, w]` over a grid of the image.

    Each map is shifted to a minimum of 0 and divided by its maximum + 1e-5, upsampled
    bilinearly (half-pixel centres, torch's align_corners=False) to the image size; the
    box spans the first to last row and column whose maximum exceeds `threshold`, as
    fractions of the size.
    """
    maps = maps - jnp.min(maps, axis=(1, 2), keepdims=True)
    maps = maps / (jnp.max(maps, axis=(1, 2), keepdims=True) + 1e-5)
    maps = jax.image.resize(maps, (maps.shape[0], image_size, image_size), 'bilinear',
                            antialias=False)

    def span(above):  # [N, image_size] booleans → first and last True
        positions = jnp.arange(image_size)
        first = jnp.min(jnp.where(above, positions, image_size - 1), axis=1)
        last = jnp.max(jnp.where(above, positions, 0), axis=1)
        return first, last

    row_min, row_max = span(jnp.max(maps, axis=2) > threshold)
    column_min, column_max = span(jnp.max(maps, axis=1) > threshold)
    return jnp.stack([row_min, column_min, row_max, column_max], axis=1) / image_size


def boxes_from_attention(attention: jax.Array, image_size: int = 224,
                         threshold: float = 0.1) -> jax.Array:
    """Boxes `[N, 4]` from a ViT's last-block attention `[N, heads, 1 + P, 1 + P]`: the
    CLS query's attention to the P patch keys, summed over heads (`boxes_from_maps`)."""
    cls_to_patches = jnp.sum(attention[:, :, 0, 1:], axis=1)
    side = int(round(cls_to_patches.shape[-1] ** 0.5))
    return boxes_from_maps(cls_to_patches.reshape(-1, side, side), image_size, threshold)


def model_boxes(model, variables, images: jax.Array, threshold: float = 0.1) -> jax.Array:
    """Boxes for normalised, square-resized images `[N, S, S, 3]` from a backbone's
    `encode`: a ViT's CLS attention, or a CAFormer's `attention_map` `[N, heads, h, w]`
    (the last attention block's, averaged over its queries, as the official
    `get_selfattention` meant; bug B7) summed over heads.

    Jit it and shard `images` over the image axis; every op is per image.
    """
    features = model.apply(variables, images, return_attention=True, method=model.encode)
    if 'attention_map' in features:
        maps = jnp.sum(features['attention_map'].astype(jnp.float32), axis=1)
        return boxes_from_maps(maps, images.shape[1], threshold)
    return boxes_from_attention(features['attention'].astype(jnp.float32), images.shape[1],
                                threshold)


def update_boxes_after(epoch: int, num_epochs: int, warmup_epochs: int,
                       loc_interval: int) -> bool:
    """Official schedule: recompute after epoch `epoch` (0-based, as the official loop)."""
    return epoch >= warmup_epochs and epoch % loc_interval == 0 and epoch != num_epochs - 1


def use_boxes_in(epoch: int, warmup_epochs: int, loc_interval: int) -> bool:
    """Crops follow the boxes from epoch max(loc_interval, warmup_epochs) + 1 on."""
    return epoch >= max(loc_interval, warmup_epochs) + 1
