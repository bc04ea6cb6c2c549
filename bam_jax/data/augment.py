"""Device-side photometric augmentations of the official `DataAugmentationDINO` (§5.1).

Colour jitter (in random order, as torchvision's `ColorJitter`), grayscale, Gaussian blur,
solarisation and the ImageNet normalisation run inside the jitted train step, on the
uint8 crops the host made. Everything is written for one image and vmapped, so no op
mixes images and XLA keeps the work on the device that holds the image. Each image's
randomness comes from its host-drawn `seed`, so it is the same on any number of devices.

Float images in [0, 1] stand in for PIL's uint8 arithmetic: the same operations without
PIL's intermediate rounding.

An augmentation whose probability is a Python 0 (the MNIST default has all of them 0)
is left out of the traced computation altogether, so it costs nothing; the others draw
from the same keys either way, so their random stream does not change.
"""

import functools

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, PIL's `convert('L')` and torchvision's `rgb_to_grayscale`.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _luma(image: jax.Array) -> jax.Array:
    return image @ jnp.asarray(LUMA_WEIGHTS, image.dtype)


def _blend(image: jax.Array, degenerate: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's `ImageEnhance`: factor 0 gives `degenerate`, 1 the image, clipped to [0, 1]."""
    return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(image, jnp.mean(_luma(image)), factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(image, _luma(image)[..., None], factor)


def rgb_to_hsv(image: jax.Array) -> jax.Array:
    red, green, blue = jnp.moveaxis(image, -1, 0)
    value = jnp.max(image, axis=-1)
    delta = value - jnp.min(image, axis=-1)
    saturation = jnp.where(value > 0, delta / jnp.where(value > 0, value, 1.0), 0.0)
    safe_delta = jnp.where(delta > 0, delta, 1.0)
    hue = jnp.where(value == red, (green - blue) / safe_delta,
                    jnp.where(value == green, 2.0 + (blue - red) / safe_delta,
                              4.0 + (red - green) / safe_delta))
    hue = jnp.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(image: jax.Array) -> jax.Array:
    """Each channel falls linearly from `value` to `value·(1 − saturation)` as the hue
    moves away from it (red at 0, green at 1/3, blue at 2/3), flat over a sixth either side."""
    hue, saturation, value = jnp.moveaxis(image, -1, 0)
    offsets = jnp.asarray([5.0, 3.0, 1.0])  # red, green, blue
    position = (offsets + hue[..., None] * 6.0) % 6.0
    ramp = jnp.clip(jnp.minimum(position, 4.0 - position), 0.0, 1.0)
    return value[..., None] * (1.0 - saturation[..., None] * ramp)


def adjust_hue(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Rotates the hue by `factor` turns (torchvision's `hue_factor`, in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(image)
    hsv = hsv.at[..., 0].set((hsv[..., 0] + factor) % 1.0)
    return hsv_to_rgb(hsv)


def color_jitter(image: jax.Array, rng: jax.Array, brightness: float, contrast: float,
                 saturation: float, hue: float) -> jax.Array:
    """torchvision's `ColorJitter`: four factors, applied in a random order."""
    order_rng, *factor_rngs = jax.random.split(rng, 5)
    factors = [
        jax.random.uniform(factor_rngs[0], minval=max(0.0, 1 - brightness), maxval=1 + brightness),
        jax.random.uniform(factor_rngs[1], minval=max(0.0, 1 - contrast), maxval=1 + contrast),
        jax.random.uniform(factor_rngs[2], minval=max(0.0, 1 - saturation), maxval=1 + saturation),
        jax.random.uniform(factor_rngs[3], minval=-hue, maxval=hue),
    ]
    operations = [functools.partial(operation, factor=factor) for operation, factor in zip(
        (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue), factors)]
    order = jax.random.permutation(order_rng, 4)
    # A loop, not four unrolled switches: each operation is traced (and compiled) once.
    return jax.lax.fori_loop(
        0, 4, lambda slot, image: jax.lax.switch(order[slot], operations, image), image)


def gaussian_blur(image: jax.Array, sigma: jax.Array, half_width: int) -> jax.Array:
    """Separable Gaussian blur with edge padding; `half_width` fixes the kernel size."""
    offsets = jnp.arange(-half_width, half_width + 1, dtype=image.dtype)
    weights = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / jnp.sum(weights)
    for axis in (0, 1):
        padding = [(0, 0)] * image.ndim
        padding[axis] = (half_width, half_width)
        padded = jnp.pad(image, padding, mode='edge')
        length = image.shape[axis]
        image = sum(weights[tap] * jax.lax.slice_in_dim(padded, tap, tap + length, axis=axis)
                    for tap in range(2 * half_width + 1))
    return image


def solarize(image: jax.Array) -> jax.Array:
    """Inverts pixels ≥ 128 (of 255), torchvision's `RandomSolarize(threshold=128)`."""
    return jnp.where(image >= 128 / 255, 1.0 - image, image)


def never(probability) -> bool:
    """True when `probability` is known at trace time to be 0 everywhere (a number or a
    tuple of them, not an array that may be traced): its augmentation is left out."""
    values = probability if isinstance(probability, (tuple, list)) else (probability,)
    return not any(isinstance(value, jax.Array) or value for value in values)


def augment_image(image: jax.Array, rng: jax.Array, blur_prob: jax.Array,
                  solarize_prob: jax.Array, config_crops, *,
                  with_blur: bool = True, with_solarize: bool = True) -> jax.Array:
    """One uint8 crop `[H, W, 3]` → float32, augmented and normalised.

    `with_blur` / `with_solarize` False leave those out (their probabilities are 0 for the view);
    jitter and grayscale are left out when their `config_crops` probability is `never`.
    """
    image = image.astype(jnp.float32) / 255.0
    # One split for all, whichever ops are left out: each op keeps its own keys. (With
    # every op left out the keys are unused, and XLA drops them.)
    jitter_rng, apply_jitter_rng, gray_rng, blur_rng, sigma_rng, solarize_rng = (
        jax.random.split(rng, 6))

    if not never(config_crops.jitter_prob):
        jittered = color_jitter(image, jitter_rng, config_crops.brightness,
                                config_crops.contrast, config_crops.saturation,
                                config_crops.hue)
        image = jnp.where(jax.random.uniform(apply_jitter_rng) < config_crops.jitter_prob,
                          jittered, image)

    if not never(config_crops.grayscale_prob):
        gray = jnp.broadcast_to(_luma(image)[..., None], image.shape)
        image = jnp.where(jax.random.uniform(gray_rng) < config_crops.grayscale_prob, gray,
                          image)

    if with_blur:
        sigma_min, sigma_max = config_crops.blur_sigma
        sigma = jax.random.uniform(sigma_rng, minval=sigma_min, maxval=sigma_max)
        half_width = min(int(3 * sigma_max + 0.5), (min(image.shape[:2]) - 1) // 2)
        blurred = gaussian_blur(image, sigma, half_width)
        # The official `random() <= p`: p = 1 always blurs (and p = 0, left out, never
        # does, where a draw of exactly 0 would).
        image = jnp.where(jax.random.uniform(blur_rng) <= blur_prob, blurred, image)

    if with_solarize:
        image = jnp.where(jax.random.uniform(solarize_rng) < solarize_prob,
                          solarize(image), image)
    return (image - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def augment_crops(batch: dict[str, jax.Array], config_crops, rng: jax.Array) -> dict:
    """The host batch's uint8 crops → float32 augmented, normalised crops, same shapes.

    Args:
      batch: 'global' `[n_global, B, G, G, 3]`, optionally 'local' `[n_local, B, L, L, 3]`,
        and 'seed' uint32 `[B, 2]` (one per image, drawn on the host); other keys pass
        through unchanged.
      config_crops: `config.crops` (probabilities, jitter strengths, blur sigma range).
      rng: folded with each image's seed and each view's number; the same `rng` and seeds
        give the same crops on any mesh.
    """
    example_rngs = jax.vmap(
        lambda seed: jax.random.fold_in(jax.random.fold_in(rng, seed[0]), seed[1]))(
            batch['seed'])
    n_global = config_crops.n_global
    probabilities = {
        'global': (config_crops.global_blur_prob, config_crops.global_solarize_prob),
        'local': ((config_crops.local_blur_prob,) * config_crops.n_local,
                  (config_crops.local_solarize_prob,) * config_crops.n_local),
    }
    first_view = {'global': 0, 'local': n_global}

    def augment_view(images, view, blur_prob, solarize_prob, **apply):
        view_rngs = jax.vmap(jax.random.fold_in, in_axes=(0, None))(example_rngs, view)
        return jax.vmap(functools.partial(augment_image, config_crops=config_crops, **apply),
                        in_axes=(0, 0, None, None))(images, view_rngs, blur_prob,
                                                     solarize_prob)

    out = dict(batch)
    for name in ('global', 'local'):
        if name not in batch:
            continue
        n_views = batch[name].shape[0]
        blur_probs, solarize_probs = (jnp.asarray(p, jnp.float32) for p in probabilities[name])
        if blur_probs.shape != (n_views,) or solarize_probs.shape != (n_views,):
            raise ValueError(f'{name} crops: {n_views} views but blur / solarize '
                             f'probabilities {blur_probs.shape} / {solarize_probs.shape}.')
        views = first_view[name] + jnp.arange(n_views)
        apply = dict(with_blur=not never(probabilities[name][0]),
                     with_solarize=not never(probabilities[name][1]))
        out[name] = jax.vmap(functools.partial(augment_view, **apply))(
            batch[name], views, blur_probs, solarize_probs)
    return out
