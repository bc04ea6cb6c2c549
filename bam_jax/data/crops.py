"""Host-side multi-crop: decode, random resized crops and flips, all in uint8.

Only the geometric part of the official `DataAugmentationDINO` runs here, because it needs
the full-resolution image; the photometric part runs on the device (`augment.py`). All
randomness comes from the `np.random.Generator` that grain seeds from (seed, example
position), so the crops do not depend on the worker count.
"""

import io
import math
from typing import Any

import numpy as np
from PIL import Image

# What PIL raises on a corrupt, truncated or absurdly large file.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

RATIO = (3 / 4, 4 / 3)


def decode(image: bytes | np.ndarray) -> Image.Image:
    """An RGB PIL image from encoded bytes or a uint8 `[H, W]` / `[H, W, C]` array."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert('RGB')
    return Image.open(io.BytesIO(image)).convert('RGB')


def sample_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: tuple[float, float], ratio: tuple[float, float] = RATIO,
                    box: np.ndarray | None = None,
                    alpha: float = 0.6) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) as torchvision's `RandomResizedCrop.get_params`.

    Ten tries of an area fraction ~ U(scale) and a log aspect ratio ~ U(log ratio); the
    first crop that fits is placed uniformly, else a centre crop clamped to `ratio`.
    With a ContrastiveCrop `box` ([h_min, w_min, h_max, w_max], fractions) the crop
    centre is instead placed inside the box, by Beta(alpha, alpha) per axis (§5.2).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            if box is None:
                top = int(rng.integers(0, height - crop_height + 1))
                left = int(rng.integers(0, width - crop_width + 1))
            else:
                top = _place_in_box(rng, height, crop_height, box[0], box[2], alpha)
                left = _place_in_box(rng, width, crop_width, box[1], box[3], alpha)
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _place_in_box(rng, length: int, crop: int, low: float, high: float, alpha: float) -> int:
    """The official ContrastiveCrop top-left: box edges minus half the crop, Beta between."""
    first = int(np.clip(int(length * low) - crop // 2, 0, length - crop))
    last = int(np.clip(int(length * high) - crop // 2, 0, length - crop))
    return first + int((last - first) * rng.beta(alpha, alpha))


def random_resized_crop(image: Image.Image, rng: np.random.Generator, size: int,
                        scale: tuple[float, float], flip_prob: float = 0.5,
                        box: np.ndarray | None = None, alpha: float = 0.6,
                        resample: int = Image.BICUBIC) -> np.ndarray:
    """One crop, resized to `size` (PIL, antialiased as torchvision's; bicubic as the
    pre-training transform, bilinear as the linear probe's), maybe flipped."""
    top, left, crop_height, crop_width = sample_crop_box(
        rng, image.height, image.width, scale, box=box, alpha=alpha)
    crop = image.crop((left, top, left + crop_width, top + crop_height))
    crop = np.asarray(crop.resize((size, size), resample))
    return crop[:, ::-1] if rng.uniform() < flip_prob else crop


def multi_crop(image: Image.Image, rng: np.random.Generator, crops_config,
               box: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """'global' uint8 `[n_global, G, G, 3]` and, if any, 'local' `[n_local, L, L, 3]`.

    With a ContrastiveCrop box the global scale's upper end is 1, as in the official
    `DataAugmentationCCrop`.
    """
    alpha = crops_config.get('ccrop_alpha', 0.6)
    global_scale = crops_config.global_scale
    if box is not None:
        global_scale = (global_scale[0], 1.0)
    views = {'global': [random_resized_crop(image, rng, crops_config.global_size, global_scale,
                                            crops_config.flip_prob, box, alpha)
                        for _ in range(crops_config.n_global)]}
    if crops_config.n_local:
        views['local'] = [random_resized_crop(image, rng, crops_config.local_size,
                                              crops_config.local_scale, crops_config.flip_prob,
                                              box, alpha)
                          for _ in range(crops_config.n_local)]
    return {name: np.stack(crops) for name, crops in views.items()}


def crop_record(record: dict[str, Any], rng: np.random.Generator, crops_config,
                boxes: np.ndarray | None = None) -> dict[str, Any]:
    """A source record → its crops, label, index and the device augmentation seed.

    A record whose image cannot be decoded comes back as `{'bad_path': path}`; the batcher
    skips, logs and counts it, in the main process, so the count is exact.
    """
    try:
        image = decode(record['image'])
    except DECODE_ERRORS:
        return {'bad_path': record['path']}
    box = None if boxes is None else boxes[record['index']]
    example = multi_crop(image, rng, crops_config, box)
    example['label'] = np.int32(record['label'])
    example['index'] = np.int32(record['index'])
    example['seed'] = rng.integers(0, 2**32, size=2, dtype=np.uint32)
    return example


def labelled_crop(record: dict[str, Any], rng: np.random.Generator, *, size: int,
                  scale: tuple[float, float], flip_prob: float,
                  randaugment=None) -> dict[str, Any]:
    """A source record → fine-tuning's training view: one bicubic random resized crop
    of `size` (torchvision's, as timm's `transforms_imagenet_train`), maybe flipped,
    then `randaugment(image, rng)` (uint8 in and out) if given; with its label and
    index. An undecodable image comes back as `{'bad_path': path}`, as in
    `crop_record`."""
    try:
        image = decode(record['image'])
    except DECODE_ERRORS:
        return {'bad_path': record['path']}
    crop = random_resized_crop(image, rng, size, scale, flip_prob)
    if randaugment is not None:
        crop = randaugment(crop, rng)
    return {'image': np.ascontiguousarray(crop), 'label': np.int32(record['label']),
            'index': np.int32(record['index'])}
