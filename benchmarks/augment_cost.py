r"""What the device-side augmentations cost inside a ViT-S/16 train step.

The step is the real one (`build_training` on the paper config, 2×224 + 6×96 crops,
8 images, fp32, one device). It is timed on host uint8 crops, which it augments
itself (jitter, grayscale, blur, solarise, normalisation), and on crops augmented
beforehand; the difference is the augmentations' share. The augmentations alone are
timed too. All figures come from one run, so only their ratios are quoted.

  python benchmarks/augment_cost.py [--images 8] [--repeats 3]

Prints a table and one JSON line.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402

from bam_jax.data import augment  # noqa: E402
from bam_jax.train import builder  # noqa: E402
from bam_jax.train.loop import data_mesh  # noqa: E402
from bam_jax.train.step import shard_batch  # noqa: E402
from configs import vit_small_imagenet  # noqa: E402


def best_time(function, repeats: int) -> float:
    jax.block_until_ready(function())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    config = vit_small_imagenet.get_config()
    config.batch_size = args.images
    config.loss.top_k = 0  # 8 images give 16 target columns; top-k is not what is timed
    crops = config.crops
    mesh = data_mesh()
    training = builder.build_training(config, mesh, steps_per_epoch=100)
    rng = np.random.default_rng(0)
    host_batch = {
        'global': rng.integers(0, 256, (crops.n_global, args.images, crops.global_size,
                                        crops.global_size, 3), dtype=np.uint8),
        'local': rng.integers(0, 256, (crops.n_local, args.images, crops.local_size,
                                       crops.local_size, 3), dtype=np.uint8),
        'seed': rng.integers(0, 2**32, (args.images, 2), dtype=np.uint32)}
    uint8_batch = shard_batch(host_batch, mesh)
    augment_only = jax.jit(lambda batch, key: augment.augment_crops(batch, crops, key))
    float_batch = augment_only(uint8_batch, jax.random.key(0))

    state = training.state

    def step(batch):
        nonlocal state
        state, metrics = training.train_step(state, batch)
        return metrics['loss']

    with_augment = best_time(lambda: step(uint8_batch), args.repeats)
    without_augment = best_time(lambda: step(float_batch), args.repeats)
    alone = best_time(lambda: augment_only(uint8_batch, jax.random.key(1)), args.repeats)
    share_in_step = (with_augment - without_augment) / with_augment
    share_alone = alone / with_augment
    rows = [('train step on uint8 crops (augments inside)', 1.0),
            ('train step on pre-augmented float crops', without_augment / with_augment),
            ('augmentations alone (jitted)', share_alone)]
    print(f'ViT-S/16, {args.images} images, 2x224 + 6x96, fp32, {jax.device_count()} device')
    width = max(len(name) for name, _ in rows)
    print(f'{"":<{width}}  time / step with augmentations')
    for name, value in rows:
        print(f'{name:<{width}}  {value:8.3f}')
    print(json.dumps(dict(images=args.images, augment_share_in_step=round(share_in_step, 4),
                          augment_alone_over_step=round(share_alone, 4))))


if __name__ == '__main__':
    main()
