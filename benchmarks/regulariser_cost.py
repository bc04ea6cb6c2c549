r"""What fine-tuning's regularisers cost on the device, beside a ViT-S/16 training step.

Mixup / CutMix (`bam_jax.data.mixup`, DeiT's settings, mode 'batch') and random erasing
(`bam_jax.data.random_erasing`, DeiT's 'pixel' mode, its noise drawn for the whole batch)
are timed jitted, on a batch of `--batch` normalised 224² images, with their random draws
included, and compared with a rough step: the forward and backward pass of a ViT-S/16 with
a 1000-class head and cross-entropy on `--step_images` images, scaled linearly to
`--batch` (the whole step does not fit a small machine). One device.

  python benchmarks/regulariser_cost.py [--batch 64] [--step_images 8] [--repeats 3]

Prints a table and one JSON line.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from _peak import best_seconds  # noqa: E402
from bam_jax.data import mixup, random_erasing  # noqa: E402
from bam_jax.models.vit import vit  # noqa: E402

SIDE, CLASSES = 224, 1000


def best_time(function, repeats: int) -> float:
    """Best wall time of `repeats` calls after one that compiles."""
    jax.block_until_ready(function())
    return best_seconds(lambda: jax.block_until_ready(function()), repeats)


def step_function(images: int):
    """Forward + backward of ViT-S/16 with a linear head, on `images` images."""
    backbone = vit('small')
    batch = jnp.asarray(np.random.default_rng(0).normal(size=(images, SIDE, SIDE, 3)),
                        jnp.float32)
    params = {'backbone': backbone.init(jax.random.key(0), batch[:1])['params'],
              'head': jnp.zeros((backbone.embed_dim, CLASSES), jnp.float32)}
    targets = jax.nn.one_hot(jnp.arange(images) % CLASSES, CLASSES)

    def loss(params, batch):
        features = backbone.apply({'params': params['backbone']}, batch)
        logits = features @ params['head']
        return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))

    gradient = jax.jit(jax.grad(loss))
    return lambda: gradient(params, batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--step_images', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    images = jnp.asarray(np.random.default_rng(1).normal(size=(args.batch, SIDE, SIDE, 3)),
                         jnp.float32)
    labels = jnp.arange(args.batch) % CLASSES
    mix_settings = mixup.MixupSettings(num_classes=CLASSES)
    mix = jax.jit(lambda key: mixup.mixup(images, labels, key, mix_settings))
    erase = jax.jit(lambda key: random_erasing.random_erasing(images, key))
    const = random_erasing.ErasingSettings(mode='const')
    erase_const = jax.jit(lambda key: random_erasing.random_erasing(images, key, const))
    mix_time = best_time(lambda: mix(jax.random.key(0)), args.repeats)
    erase_time = best_time(lambda: erase(jax.random.key(0)), args.repeats)
    const_time = best_time(lambda: erase_const(jax.random.key(0)), args.repeats)
    step_time = best_time(step_function(args.step_images), args.repeats)
    step_time *= args.batch / args.step_images

    rows = [('ViT-S/16 forward + backward (scaled)', step_time),
            ('mixup / CutMix (draws included)', mix_time),
            ('random erasing, pixel noise (draws included)', erase_time),
            ('random erasing, zero fill (no noise drawn)', const_time)]
    print(f'{args.batch} x {SIDE}^2 x 3 float32, 1 device ({jax.devices()[0].device_kind})')
    print('\n'.join(f'{name:<46}{seconds * 1e3:10.1f} ms{seconds / step_time:9.2%}'
                    for name, seconds in rows))
    print(json.dumps(dict(batch=args.batch, step_images=args.step_images,
                          step_ms=round(step_time * 1e3, 1), mixup_ms=round(mix_time * 1e3, 2),
                          erasing_ms=round(erase_time * 1e3, 2),
                          erasing_const_ms=round(const_time * 1e3, 2),
                          mixup_over_step=round(mix_time / step_time, 5),
                          erasing_over_step=round(erase_time / step_time, 5))))


if __name__ == '__main__':
    main()
