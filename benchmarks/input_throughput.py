r"""Host input throughput, images per second on one core: bam_jax's host crops vs plain PIL.

Both sides decode a JPEG photo (≈500×375, scikit-image's bundled CC0 photos, encoded once
in memory, decoded every time) and make 2×224 + 6×96 crops with the official sampling.
bam_jax's host side stops at uint8 crops (its photometric part runs on the device);
the PIL baseline runs the whole official `DataAugmentationDINO` per image, as
torchvision's per-image transforms do, up to normalised float32 arrays.

  python benchmarks/input_throughput.py [--seconds 10] [--device]

Prints a table and one JSON line. `--device` also times the jitted device-side part on
one CPU core (not representative of an accelerator).
"""

import argparse
import io
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from bam_jax.data import crops as crops_lib  # noqa: E402
from configs import vit_small_imagenet  # noqa: E402

PHOTOS = ('chelsea', 'coffee', 'astronaut', 'rocket', 'hubble_deep_field', 'immunohistochemistry')
PHOTO_SIZE = (500, 375)
MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
STD = np.asarray((0.229, 0.224, 0.225), np.float32)


def jpeg_photos() -> list[bytes]:
    """Real photos, resized to ≈500×375 and JPEG-encoded (quality 90) once."""
    from skimage import data

    encoded = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert('RGB')
        buffer = io.BytesIO()
        image.resize(PHOTO_SIZE, Image.BICUBIC).save(buffer, format='JPEG', quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def pil_augment(data: bytes, rng: np.random.Generator, config) -> list[np.ndarray]:
    """The whole official augmentation with PIL, one image at a time (the baseline)."""
    image = Image.open(io.BytesIO(data)).convert('RGB')
    views = []
    specs = ([(config.global_size, config.global_scale, blur, solarize) for blur, solarize
              in zip(config.global_blur_prob, config.global_solarize_prob)]
             + [(config.local_size, config.local_scale, config.local_blur_prob,
                 config.local_solarize_prob)] * config.n_local)
    for size, scale, blur_prob, solarize_prob in specs:
        top, left, height, width = crops_lib.sample_crop_box(rng, image.height, image.width,
                                                             scale)
        view = image.crop((left, top, left + width, top + height)).resize((size, size),
                                                                          Image.BICUBIC)
        if rng.uniform() < config.flip_prob:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.uniform() < config.jitter_prob:
            view = pil_color_jitter(view, rng, config)
        if rng.uniform() < config.grayscale_prob:
            view = view.convert('L').convert('RGB')
        if rng.uniform() <= blur_prob:
            view = view.filter(ImageFilter.GaussianBlur(rng.uniform(*config.blur_sigma)))
        if rng.uniform() < solarize_prob:
            view = ImageOps.solarize(view, 128)
        views.append(((np.asarray(view, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1))
    return views


def pil_color_jitter(view: Image.Image, rng: np.random.Generator, config) -> Image.Image:
    """torchvision's PIL `ColorJitter`: enhance factors and an HSV hue shift, random order."""
    enhancers = [(ImageEnhance.Brightness, config.brightness),
                 (ImageEnhance.Contrast, config.contrast),
                 (ImageEnhance.Color, config.saturation)]
    for operation in rng.permutation(4):
        if operation < 3:
            enhancer, strength = enhancers[operation]
            view = enhancer(view).enhance(rng.uniform(max(0, 1 - strength), 1 + strength))
        else:
            hue, saturation, value = view.convert('HSV').split()
            shift = int(rng.uniform(-config.hue, config.hue) * 255)
            hue = Image.fromarray((np.asarray(hue, np.uint8) + np.uint8(shift % 256)))
            view = Image.merge('HSV', (hue, saturation, value)).convert('RGB')
    return view


def rate(function, photos: list[bytes], seconds: float) -> float:
    """Images per second of `function(photo, rng)` over the photos, for ≈`seconds`."""
    rng = np.random.default_rng(0)
    function(photos[0], rng)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for photo in photos:
            function(photo, rng)
        count += len(photos)
    return count / (time.perf_counter() - start)


def device_rate(config, batch_size: int = 32, repeats: int = 5) -> float:
    """Images per second of the jitted device-side augmentation on this CPU."""
    import functools
    import jax
    from bam_jax.data import augment

    rng = np.random.default_rng(0)
    batch = {
        'global': rng.integers(0, 256, (config.n_global, batch_size, config.global_size,
                                        config.global_size, 3), dtype=np.uint8),
        'local': rng.integers(0, 256, (config.n_local, batch_size, config.local_size,
                                       config.local_size, 3), dtype=np.uint8),
        'seed': rng.integers(0, 2**32, (batch_size, 2), dtype=np.uint32)}
    step = jax.jit(functools.partial(augment.augment_crops, config_crops=config))
    jax.block_until_ready(step(batch, rng=jax.random.key(0)))
    start = time.perf_counter()
    for i in range(repeats):
        jax.block_until_ready(step(batch, rng=jax.random.key(i)))
    return repeats * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seconds', type=float, default=10.0, help='per measurement')
    parser.add_argument('--device', action='store_true', help='also time the device part')
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one host core

    config = vit_small_imagenet.get_config().crops
    photos = jpeg_photos()
    decode = rate(lambda photo, rng: crops_lib.decode(photo), photos, args.seconds)
    ours = rate(lambda photo, rng: crops_lib.multi_crop(crops_lib.decode(photo), rng, config),
                photos, args.seconds)
    pil = rate(lambda photo, rng: pil_augment(photo, rng, config), photos, args.seconds)
    rows = [('decode only', decode),
            ('bam_jax host: decode + 2x224 + 6x96 crops + flips (uint8)', ours),
            ('plain PIL per image: full DataAugmentationDINO (float32)', pil)]
    result = dict(photos=len(photos), photo_size=PHOTO_SIZE, decode_per_core=decode,
                  bam_jax_host_per_core=ours, pil_per_core=pil, ratio=ours / pil)
    if args.device:
        result['device_cpu_images_per_s'] = device_rate(config)
        rows.append(('bam_jax device part, jitted, on this CPU core',
                     result['device_cpu_images_per_s']))
    width = max(len(name) for name, _ in rows)
    print(f'{"pipeline (one core)":<{width}}  images/s  ms/image')
    for name, value in rows:
        print(f'{name:<{width}}  {value:8.1f}  {1000 / value:8.2f}')
    print(f'ratio bam_jax host / PIL: {ours / pil:.2f}x')
    print(json.dumps({key: round(value, 2) if isinstance(value, float) else value
                      for key, value in result.items()}))
    assert math.isfinite(result['ratio'])


if __name__ == '__main__':
    main()
