r"""Seconds per 480p frame of the DAVIS protocol (`bam_jax.evaluate.davis`), ViT-S/16.

A 480p DAVIS frame (854×480) is resized as DINO does to 832×480, a 52×30 patch grid;
the ViT-S/16 of `configs/vit_small_imagenet.py` at its random initialisation (speed
does not depend on the weights) gives its last-block patch tokens, and the label
propagation runs with DINO's values (the first frame and 7 previous ones, a 12-patch
neighbourhood, top 5) on 3 object channels. Both parts are timed on batches of
`--batch` frames after a warm-up (compilation excluded), `--repeats` times, the best
kept:
  features:    frames → resized, normalised → patch tokens (the jitted `frame_features_fn`)
  propagation: one `lax.scan` over the batch (`propagate`: affinities, top-k, soft
               labels, upsampling, min-max, argmax)

  python benchmarks/davis_speed.py [--batch 8] [--repeats 3]

Prints a table and one JSON line.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from _peak import best_seconds, cpu_model  # noqa: E402
from configs import vit_small_imagenet  # noqa: E402
from bam_jax.evaluate import davis  # noqa: E402
from bam_jax.models import multicrop  # noqa: E402

FRAME = (480, 854)
N_LAST_FRAMES, CHANNELS = 7, 3


def timed(function, repeats: int) -> float:
    """Best seconds of `repeats` calls after a first one that compiles."""
    jax.block_until_ready(function())
    return best_seconds(lambda: jax.block_until_ready(function()), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    config = vit_small_imagenet.get_config()
    backbone = multicrop.build_network(config).backbone
    patch = backbone.patch_size
    size = davis.resized_shape(*FRAME, 480, 64)
    grid = (size[0] // patch, size[1] // patch)
    variables = backbone.init(jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32))
    features_fn = davis.frame_features_fn(backbone, variables, mean=(0.485, 0.456, 0.406),
                                          std=(0.228, 0.224, 0.225), norm=True)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.batch, *FRAME, 3), np.uint8)
    features = features_fn(frames, size)
    feature_seconds = timed(lambda: features_fn(frames, size), args.repeats)

    labels = np.eye(CHANNELS, dtype=np.float32)[rng.integers(0, CHANNELS, grid[0] * grid[1])]
    queue = davis.empty_queue(N_LAST_FRAMES, features.shape[1], features.shape[2], CHANNELS)
    # A full queue, as for every frame after the 7th.
    queue = queue._replace(features=features[np.arange(N_LAST_FRAMES) % args.batch],
                           labels=np.repeat(labels[None], N_LAST_FRAMES, 0),
                           present=np.ones(N_LAST_FRAMES, bool))
    valid = np.ones(args.batch, bool)

    def propagate():
        return davis._propagate(queue, features[0], labels, features, valid, grid=grid,
                                patch_size=patch, radius=12, topk=5, temperature=0.1)
    propagation_seconds = timed(propagate, args.repeats)

    per_frame = {'features': feature_seconds / args.batch,
                 'propagation': propagation_seconds / args.batch}
    per_frame['total'] = per_frame['features'] + per_frame['propagation']
    print(f'ViT-S/{patch}, {FRAME[1]}x{FRAME[0]} frames resized to {size[1]}x{size[0]} '
          f'({grid[1]}x{grid[0]} patches), batches of {args.batch}, '
          f'{jax.device_count()} {jax.devices()[0].platform} device(s), '
          f'n_last_frames={N_LAST_FRAMES}; {cpu_model()}, {os.cpu_count()} cores')
    print(f'{"part":<12}  s/frame  share')
    for name, seconds in per_frame.items():
        print(f'{name:<12}  {seconds:7.3f}  {seconds / per_frame["total"]:5.0%}')
    print(json.dumps({'benchmark': 'davis_speed', 'model': f'vit_small/{patch}',
                      'frame': list(FRAME), 'resized': list(size), 'batch': args.batch,
                      'n_last_frames': N_LAST_FRAMES, 'devices': jax.device_count(),
                      'cpu': cpu_model(), 'cores': os.cpu_count(),
                      'seconds_per_frame': per_frame}))


if __name__ == '__main__':
    main()
