r"""The BAM loss kernel on one device: forward + backward time, GFLOP/s, fraction of peak, memory.

  python benchmarks/loss_kernel.py [--batches 64 128 256] [--top-k 128 0] [--repeats 5]

The paper's setting per device: 2 global + 6 local crops of `b` images, D = 4096, the
teacher path (targets from the teacher, no gradient through them), positive masking,
3 Sinkhorn sweeps. The FLOPs are the loss's three matmuls counted analytically
(student and teacher similarities, and the gradient back to the student embeddings),
each `2 · n_crops·b · K · D` with K = 2·b columns. The peak is measured in the same run
(`benchmarks/_peak.py`). Prints a table and one JSON line.
"""

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import _peak  # noqa: E402
from bam_jax.loss import bam_loss  # noqa: E402

N_GLOBAL_CROPS, N_LOCAL_CROPS, DIM = 2, 6, 4096
GIB = 2 ** 30


def loss_matmul_flops(n_local_images: int, n_devices: int = 1, n_crops: int = 8,
                      n_target_crops: int = 2, dim: int = DIM) -> float:
    """Student and teacher similarities plus the gradient to the student, per device."""
    rows, columns = n_crops * n_local_images, n_target_crops * n_local_images * n_devices
    return 3 * 2.0 * rows * columns * dim


def compiled_loss_step(mesh, n_images: int, top_k: int):
    """The jitted forward + backward of the loss (w.r.t. the student), compiled."""
    n_crops = N_GLOBAL_CROPS + N_LOCAL_CROPS
    rows = NamedSharding(mesh, P(None, 'data', None))
    shape = jax.ShapeDtypeStruct((n_crops, n_images, DIM), jnp.float32, sharding=rows)
    loss = functools.partial(bam_loss, n_global_crops=N_GLOBAL_CROPS, temperature=0.1,
                             sinkhorn_reg=0.05, sinkhorn_iters=3, top_k=top_k,
                             positive_masking=True, mesh=mesh)

    def loss_and_grad(student, teacher):
        return jax.value_and_grad(lambda s: loss(s, teacher)[0])(student)

    return jax.jit(loss_and_grad).lower(shape, shape).compile(), shape


def loss_step_runner(compiled, shape):
    """A call of the compiled loss step on random embeddings, waiting for the result."""
    keys = jax.random.split(jax.random.key(0))
    student, teacher = (jax.device_put(jax.random.normal(key, shape.shape), shape.sharding)
                        for key in keys)
    jax.block_until_ready(compiled(student, teacher))
    return lambda: jax.block_until_ready(compiled(student, teacher))


def time_loss_step(compiled, shape, repeats: int) -> float:
    return _peak.best_seconds(loss_step_runner(compiled, shape), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[64, 128, 256])
    parser.add_argument('--top-k', type=int, nargs='+', default=[128, 0])
    parser.add_argument('--repeats', type=int, default=10)
    args = parser.parse_args()

    mesh = jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:1])
    cases, runners = {}, {}
    for top_k in args.top_k:
        for n_images in args.batches:
            compiled, shape = compiled_loss_step(mesh, n_images, top_k)
            cases[n_images, top_k] = compiled
            runners[f'b={n_images} top_k={top_k}'] = loss_step_runner(compiled, shape)
    peak = _peak.measure_peak(repeats=args.repeats, also=runners)
    rows = []
    for (n_images, top_k), compiled in cases.items():
        seconds = peak['seconds'][f'b={n_images} top_k={top_k}']
        flops = loss_matmul_flops(n_images)
        memory = compiled.memory_analysis()
        rows.append(dict(b=n_images, top_k=top_k, seconds=seconds, gflop=flops / 1e9,
                         gflops=flops / seconds / 1e9,
                         fraction_of_peak=flops / seconds / 1e9 / peak['peak_gflops'],
                         temp_mib=memory.temp_size_in_bytes / 2 ** 20,
                         argument_mib=memory.argument_size_in_bytes / 2 ** 20))
    del peak['seconds']

    print(f"BAM loss forward + backward, 1 device, {N_GLOBAL_CROPS}+{N_LOCAL_CROPS} "
          f"crops, D={DIM}, teacher, masking, 3 Sinkhorn sweeps; best of {args.repeats}")
    print(f"peak {peak['peak_gflops']:.0f} GFLOP/s ({peak['peak_source']}; numpy "
          f"{peak['numpy_gflops']:.0f}, jax {peak['jax_gflops']:.0f}), timed in turns "
          f"with the loss; load average {peak['load_average'][0]:.1f}")
    print(f"{'b':>5} {'top-k':>6} {'ms':>8} {'GFLOP':>7} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'temp MiB':>9} {'args MiB':>9}")
    for row in rows:
        print(f"{row['b']:>5} {row['top_k']:>6} {row['seconds'] * 1e3:8.1f} "
              f"{row['gflop']:7.2f} {row['gflops']:8.1f} {row['fraction_of_peak']:8.1%} "
              f"{row['temp_mib']:9.1f} {row['argument_mib']:9.1f}")
    print(json.dumps({'benchmark': 'loss_kernel', 'peak': peak, 'rows': rows}))


if __name__ == '__main__':
    main()
