r"""The ViT-S/16 fine-tuning step on one CPU device: images/s and MFU, regularisers on and off.

  python benchmarks/finetune_step.py [--images 16] [--steps 5]

The step is the one `bam_jax.train.finetune.build_finetuning` builds from
configs/finetune_imagenet.py (DeiT's recipe: 224 px uint8 crops normalised on the
device, random erasing 0.25 and mixup 0.8 / CutMix 1.0 with label smoothing per device,
drop path 0.1, the classifier's forward and backward, AdamW), at `--images` images, and
the same step with the regularisers off (no erasing, no mixing: smoothed one-hot targets;
drop path 0). FLOPs per image are the matmuls counted analytically (forward + backward =
3 forwards, the patch projection trained); MFU is that per second over the fp32 matmul
peak measured in the same run, in turns with the steps (`_peak.measure_peak`). Prints a
table and one JSON line.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import _peak  # noqa: E402
from bam_jax.train import finetune  # noqa: E402
from bam_jax.train.step import shard_batch  # noqa: E402
from configs import finetune_imagenet  # noqa: E402
from train_step import patch_embed_flops, vit_forward_flops  # noqa: E402


def config_for(images: int, regularisers: bool):
    config = finetune_imagenet.get_config()
    config.batch_size = images
    config.num_classes = 1000
    if not regularisers:
        config.regularisers.update(mixup_alpha=0.0, cutmix_alpha=0.0, erasing_prob=0.0)
        config.model.drop_path_rate = 0.0
    return config


def flops_per_image(model, config) -> float:
    backbone, size = model.backbone, config.input.image_size
    forward = (vit_forward_flops(backbone, size) + patch_embed_flops(backbone, size)
               + 2 * backbone.embed_dim * config.num_classes)
    return 3 * forward


def build(images: int, regularisers: bool):
    config = config_for(images, regularisers)
    mesh = jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:1])
    training = finetune.build_finetuning(config, mesh, steps_per_epoch=1000)
    rng = np.random.default_rng(0)
    batch = shard_batch({'image': rng.integers(0, 256, (images, 224, 224, 3), np.uint8),
                         'label': rng.integers(0, 1000, images).astype(np.int32)}, mesh)
    compiled = training.train_step.lower(training.state, batch).compile()
    state = [training.state]

    def step():
        state[0], metrics = compiled(state[0], batch)
        return jax.block_until_ready(metrics)

    step()
    return step, flops_per_image(training.model, config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--images', type=int, default=16)
    parser.add_argument('--steps', type=int, default=5)
    args = parser.parse_args()
    steps, flops = {}, {}
    for name, regularisers in (('regularisers_on', True), ('regularisers_off', False)):
        steps[name], flops[name] = build(args.images, regularisers)
    peak = _peak.measure_peak(repeats=args.steps, also=steps)
    rows = {}
    for name in steps:
        seconds = peak['seconds'][name]
        rows[name] = dict(step_seconds_best=seconds, images_per_second=args.images / seconds,
                          gflop_per_image=flops[name] / 1e9,
                          mfu=flops[name] * args.images / seconds / 1e9 / peak['peak_gflops'])
    overhead = rows['regularisers_on']['step_seconds_best'] / rows[
        'regularisers_off']['step_seconds_best'] - 1
    print(f'ViT-S/16 fine-tuning step, {args.images} images of 224 px, one CPU device; '
          f'fp32 matmul peak {peak["peak_gflops"]:.0f} GFLOP/s, load {peak["load_average"]}')
    print(f'{"":18} {"s/step":>8} {"images/s":>9} {"GFLOP/img":>10} {"MFU":>6}')
    for name, row in rows.items():
        print(f'{name:18} {row["step_seconds_best"]:8.3f} {row["images_per_second"]:9.2f} '
              f'{row["gflop_per_image"]:10.1f} {100 * row["mfu"]:5.1f}%')
    print(f'regularisers cost {100 * overhead:.1f} % of the step')
    print(json.dumps(dict(images=args.images, peak_gflops=peak['peak_gflops'],
                          load_average=peak['load_average'], rows=rows,
                          regulariser_overhead=overhead)))


if __name__ == '__main__':
    main()
