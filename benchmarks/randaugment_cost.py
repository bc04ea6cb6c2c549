r"""What RandAugment (`bam_jax.data.randaugment`, DeiT's rand-m9-mstd0.5-inc1) costs the host.

Per 224 × 224 uint8 RGB image, in one process (one grain worker): the whole policy with its
draws, averaged over `--images` images, and each op alone at magnitude 9. With `--timm`,
timm's own RandAugment on the same images, for comparison (imports torch; run it where
TensorFlow is not imported).

  python benchmarks/randaugment_cost.py [--images 500] [--repeats 3] [--timm]

Prints a table and one JSON line (microseconds per image).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from bam_jax.data import randaugment  # noqa: E402

SIDE = 224


def images(count: int) -> list[np.ndarray]:
    """Smooth colour images with noise: neither flat nor pure noise, like photographs."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    out = []
    for _ in range(count):
        phase = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(6 * rows + p) * np.cos(5 * cols - p) for p in phase], -1)
        noisy = 127.5 + 100 * base + rng.normal(0, 12, base.shape)
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


def per_image(function, inputs, repeats: int) -> float:
    """Best, over `repeats` passes, of the mean seconds per input."""
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        for item in inputs:
            function(item)
        best = min(best, (time.perf_counter() - start) / len(inputs))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=500)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--timm', action='store_true')
    args = parser.parse_args()
    batch = images(args.images)
    settings = randaugment.RandAugmentSettings()
    rng = np.random.default_rng(1)
    rows = {'policy (draws included)': per_image(
        lambda image: randaugment.rand_augment(image, rng, settings), batch, args.repeats)}
    rows['uint8 array -> PIL -> array only'] = per_image(
        lambda image: randaugment.apply(image, randaugment.Draws(
            np.zeros(0, int), *(np.zeros(0),) * 3), settings), batch, args.repeats)
    few = batch[:max(1, args.images // 5)]
    for op, name in enumerate(randaugment.OPS):
        draws = randaugment.Draws(np.array([op]), np.zeros(1), np.zeros(1), np.zeros(1))
        rows[name] = per_image(lambda image, d=draws: randaugment.apply(image, d, settings),
                               few, args.repeats)
    if args.timm:
        from PIL import Image
        from timm.data import create_transform
        from timm.data.auto_augment import RandAugment
        pipeline = create_transform(SIDE, is_training=True,
                                    auto_augment='rand-m9-mstd0.5-inc1',
                                    interpolation='bicubic')
        policy = next(t for t in pipeline.transforms if isinstance(t, RandAugment))
        rows['timm policy (PIL in, PIL out)'] = per_image(
            policy, [Image.fromarray(image) for image in batch], args.repeats)
    print(f'{args.images} images of {SIDE}x{SIDE}x3 uint8, one process, best of '
          f'{args.repeats}')
    print('\n'.join(f'{name:<40}{seconds * 1e6:10.0f} us' for name, seconds in rows.items()))
    print(json.dumps({name: round(seconds * 1e6, 1) for name, seconds in rows.items()}))


if __name__ == '__main__':
    main()
