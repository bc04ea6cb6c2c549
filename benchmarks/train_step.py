r"""The full BAM train step on one CPU device: images/s, FLOPs per image, MFU, and a profile.

  python benchmarks/train_step.py [--configs vit_small tiny mnist] [--steps 5] [--profile] [--uint8]

The step is the one `bam_jax.train.builder.build_training` builds for a run: student
and teacher forward on every crop, the BAM loss, backward, clipped AdamW and the EMA,
with the state donated. `vit_small` is the paper's ViT-S/16 run (2×224 + 6×96 crops,
fp32) at 8 images; `tiny` is the same recipe at small shapes (issue 15: a ViT of width
192, depth 6, 3 heads on 4 px patches of 32 px crops, 2 × 32 + 4 × 16 px crops, a
1024-wide projector, 64 images, fp32), where the per-op costs XLA adds to the matmuls
weigh most; `mnist` is the default run, `configs/mnist.py` as it is (its batch, 32 px
global and 16 px local crops). Top-k is off for `vit_small` and `tiny` (their batches
give 16 and 128 target columns, the paper's top-k is 128). The crops are pre-augmented
floats unless `--uint8`, which makes the step run the device augmentations too.

FLOPs per image are the step's matmuls counted analytically (student forward and
backward = 3 forwards, teacher 1 forward, the frozen patch projection gets no backward),
and also as XLA's cost analysis of the compiled step counts them (every op). MFU is the
analytic count per second over the fp32 matmul peak measured in the same run. `RSS GiB`
is the process's peak resident memory after the config (cumulative: run a config alone
to read its own). Each config is compared with the same step in PyTorch, which
`torch_step.py --config NAME` times right after it, in this run. With `--profile`,
one more step is traced and its op time is summed by category. Prints the tables and
one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import _peak  # noqa: E402
import _profile  # noqa: E402
from bam_jax.train import builder  # noqa: E402
from bam_jax.data.augment import augment_crops  # noqa: E402
from bam_jax.train.step import shard_batch  # noqa: E402
from step_configs import CONFIGS, tiny_config, vit_small_config  # noqa: E402,F401



def vit_forward_flops(backbone, image_size: int) -> float:
    """Matmul FLOPs of one ViT forward on one image (patch conv counted separately)."""
    dim, depth = backbone.embed_dim, backbone.depth
    tokens = 1 + (image_size // backbone.patch_size) ** 2
    hidden = int(dim * backbone.mlp_ratio)
    dense = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)
    attention = 2 * 2 * tokens * tokens * dim
    return depth * (dense + attention)


def patch_embed_flops(backbone, image_size: int) -> float:
    patches = (image_size // backbone.patch_size) ** 2
    return 2 * patches * 3 * backbone.patch_size ** 2 * backbone.embed_dim


def projector_flops(projector, in_dim: int) -> float:
    widths = [in_dim] + [projector.hidden_dim] * (projector.n_layers - 1) + [projector.out_dim]
    return sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))


def step_flops_per_image(network, config) -> float:
    """Analytic matmul FLOPs of one train step, per image."""
    crops, backbone = config.crops, network.backbone
    forward = projector_flops(network.projector, backbone.embed_dim) * (
        crops.n_global + crops.n_local)
    frozen = 0.0
    for n_views, size in ((crops.n_global, crops.global_size),
                          (crops.n_local, crops.local_size)):
        forward += n_views * vit_forward_flops(backbone, size)
        frozen += n_views * patch_embed_flops(backbone, size)
    n_crops = crops.n_global + crops.n_local
    columns = crops.n_global * config.batch_size
    loss = 3 * 2 * n_crops * columns * network.projector.out_dim
    # Student: forward + backward (2 forwards); teacher: forward. The frozen patch
    # projection runs forward twice and has no backward (its input needs no gradient).
    return 4 * forward + 2 * frozen + loss


def synthetic_batch(config, mesh, uint8: bool):
    """Random host crops (uint8, with per-image seeds) as the pipeline gives them.

    Unless `uint8`, they are augmented once here, so the step gets float crops and
    times the model alone (the official loop augments in its data loader workers).
    """
    crops, n_images = config.crops, config.batch_size
    rng = np.random.default_rng(0)
    host_batch = {'seed': rng.integers(0, 2 ** 32, (n_images, 2), dtype=np.uint32)}
    for group, (n_views, size) in (('global', (crops.n_global, crops.global_size)),
                                   ('local', (crops.n_local, crops.local_size))):
        if n_views:
            host_batch[group] = rng.integers(0, 256, (n_views, n_images, size, size, 3),
                                             dtype=np.uint8)
    batch = shard_batch(host_batch, mesh)
    if not uint8:
        batch = jax.jit(lambda batch: augment_crops(batch, crops, jax.random.key(0)))(batch)
    return batch


def categorize(op_name: str, is_matmul: bool) -> str:
    """The part of the step an HLO op belongs to, from its `op_name` metadata."""
    in_network = 'MultiCropNetwork' in op_name
    if is_matmul:
        if '/attn/bh' in op_name:
            return 'matmul: attention (q·k, p·v)'
        if 'patch_embed' in op_name:
            return 'matmul: patch projection (conv)'
        return 'matmul: dense layers' if in_network else 'matmul: loss'
    if in_network:
        for marker, category in (('/attn/', 'attention softmax, head transposes'),
                                 ('/mlp/', 'GELU, biases'), ('/projector/', 'GELU, biases'),
                                 ('/norm', 'LayerNorm'), ('_embed', 'patch/position embedding')):
            if marker in op_name:
                return category
        return 'residual adds, crop reshapes'
    if '/jvp()/' in op_name or 'transpose(jvp())' in op_name:
        return 'BAM loss (non-matmul)'
    return 'AdamW, EMA, schedules, metrics'


def torch_step_seconds(n_steps: int, name: str = 'tiny') -> float:
    """The best step time of `torch_step.py --config NAME` (the same work in PyTorch),
    run now: a ratio holds only beside its baseline, in the same run."""
    output = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), 'torch_step.py'),
         '--config', name, '--steps', str(n_steps)], check=True, capture_output=True,
        text=True).stdout
    return json.loads(output.splitlines()[-1])['results'][0]['step_seconds_best']


def measure(name: str, n_steps: int, profile: bool, uint8: bool) -> dict:
    config = CONFIGS[name]()
    mesh = jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:1])
    training = builder.build_training(config, mesh, steps_per_epoch=1000)
    batch = synthetic_batch(config, mesh, uint8)
    start = time.perf_counter()
    compiled = training.train_step.lower(training.state, batch).compile()
    compile_seconds = time.perf_counter() - start
    state = [training.state]

    def step():
        state[0], metrics = compiled(state[0], batch)
        return metrics

    jax.block_until_ready(step())
    # The peak matmuls and the steps in turns, so both see the same background load.
    peak = _peak.measure_peak(repeats=n_steps,
                              also={'step': lambda: jax.block_until_ready(step())})
    best, peak_gflops = peak['seconds']['step'], peak['peak_gflops']
    flops = step_flops_per_image(training.network, config)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result = dict(
        config=name, images=config.batch_size, device_augmentations=uint8,
        compile_seconds=compile_seconds,
        step_seconds_best=best,
        images_per_second=config.batch_size / best,
        gflop_per_image=flops / 1e9,
        hlo_gflop_per_image=cost.get('flops', float('nan')) / config.batch_size / 1e9,
        gflops=flops * config.batch_size / best / 1e9, peak_gflops=peak_gflops,
        mfu=flops * config.batch_size / best / 1e9 / peak_gflops,
        temp_gib=compiled.memory_analysis().temp_size_in_bytes / 2 ** 30,
        # Cumulative: the process's peak after this and the configs before it.
        process_peak_rss_gib=_peak.process_peak_rss_gib(),
        load_average=peak['load_average'], cpu=_peak.cpu_model())
    result['pytorch_step_seconds'] = torch_step_seconds(n_steps, name)
    result['vs_pytorch'] = result['pytorch_step_seconds'] / best
    if profile:
        result['profile'] = _profile.summarize(compiled, step, categorize)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--configs', nargs='+', choices=sorted(CONFIGS),
                        default=['vit_small', 'tiny', 'mnist'])
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--profile', action='store_true')
    parser.add_argument('--uint8', action='store_true',
                        help='feed uint8 crops: the step also runs the device augmentations')
    args = parser.parse_args()
    results = [measure(name, args.steps, args.profile, args.uint8) for name in args.configs]

    print(f'on {results[0]["cpu"]}, {os.cpu_count()} cores')
    print(f"{'config':<10} {'images':>6} {'step s':>7} {'images/s':>9} "
          f"{'GFLOP/img':>9} {'XLA GFLOP/img':>13} {'GFLOP/s':>8} {'peak':>6} {'MFU':>6} "
          f"{'temp GiB':>8} {'RSS GiB':>7}")
    for r in results:
        print(f"{r['config']:<10} {r['images']:>6} {r['step_seconds_best']:7.2f} "
              f"{r['images_per_second']:9.2f} "
              f"{r['gflop_per_image']:9.1f} {r['hlo_gflop_per_image']:13.1f} "
              f"{r['gflops']:8.1f} {r['peak_gflops']:6.0f} {r['mfu']:6.1%} "
              f"{r['temp_gib']:8.2f} {r['process_peak_rss_gib']:7.2f}")
        print(f"  load average {r['load_average'][0]:.1f} before, "
              f"{r['load_average'][1]:.1f} after")
        print(f"  vs the same step in PyTorch, timed in this run ({r['pytorch_step_seconds']:.2f} "
              f"s for {r['images']} images): {r['vs_pytorch']:.2f}x the images/s")
    for r in results:
        if 'profile' in r:
            total = sum(seconds for _, seconds in r['profile'])
            print(f"\nprofile of one {r['config']} step: op time by part "
                  f"(summed over threads: {total:.2f} s)")
            for category, seconds in r['profile']:
                print(f"  {category:<38} {seconds:7.2f} s {seconds / total:6.1%}")
    print(json.dumps({'benchmark': 'train_step', 'results': results}))


if __name__ == '__main__':
    main()
