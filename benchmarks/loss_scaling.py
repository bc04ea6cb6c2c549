r"""How the BAM loss's per-device cost grows with the number of devices at a fixed per-device batch.

  python benchmarks/loss_scaling.py [--devices 1 2 4 8] [--batch 64] [--repeats 10]

Each device holds `b` images (2 + 6 crops, D = 4096, teacher, top-k 128, 3 Sinkhorn
sweeps) and compares its rows with the target columns of *all* devices: K = 2·b·n
columns on n devices. Per device, the loss's matmul FLOPs and its [rows, K] temporaries
therefore grow linearly with n (with the column count), not with the square of the
global crop count as the paper's square matrix would. Memory is the compiled per-device
temporary size; time is the forward + backward of the whole sharded loss. The devices are
simulated on this machine's CPU cores, so they share them: the wall time divided by
n is each device's share, the number to compare with the per-device FLOPs; GFLOP/s is
the machine's total over all devices, which shows what the sharing itself costs.
Prints a table and one JSON line.
"""

import argparse
import json
import os
import sys

os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''),
                                    '--xla_force_host_platform_device_count=8'])
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import _peak  # noqa: E402
from loss_kernel import compiled_loss_step, loss_matmul_flops, loss_step_runner  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--devices', type=int, nargs='+', default=[1, 2, 4, 8])
    parser.add_argument('--batch', type=int, default=64, help='images per device')
    parser.add_argument('--top-k', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=10)
    args = parser.parse_args()

    compiled = {}
    for n_devices in args.devices:
        mesh = jax.make_mesh((n_devices,), ('data',), axis_types=(AxisType.Auto,),
                             devices=jax.devices()[:n_devices])
        compiled[n_devices] = compiled_loss_step(mesh, args.batch * n_devices, args.top_k)
    # All device counts timed in turns (with the peak matmuls), best of `repeats` each.
    timing = _peak.measure_peak(repeats=args.repeats, also={
        n_devices: loss_step_runner(*compiled_and_shape)
        for n_devices, compiled_and_shape in compiled.items()})
    rows = []
    for n_devices, (step, _) in compiled.items():
        seconds = timing['seconds'][n_devices]
        memory = step.memory_analysis()
        rows.append(dict(devices=n_devices, columns=2 * args.batch * n_devices,
                         gflop_per_device=loss_matmul_flops(args.batch, n_devices) / 1e9,
                         seconds=seconds, seconds_per_device=seconds / n_devices,
                         temp_mib=memory.temp_size_in_bytes / 2 ** 20,
                         argument_mib=memory.argument_size_in_bytes / 2 ** 20))
    first = rows[0]
    print(f"BAM loss forward + backward, {args.batch} images per device, 2+6 crops, "
          f"D=4096, top-k {args.top_k}; growth relative to {first['devices']} device(s)")
    print(f"{'devices':>7} {'columns':>7} {'GFLOP/dev':>9} {'temp MiB':>9} {'args MiB':>9} "
          f"{'wall ms':>8} {'ms/dev':>7} {'GFLOP/s':>7} | {'columns×':>8} {'columns²×':>9} {'temp×':>6} "
          f"{'FLOP×':>6} {'time/dev×':>9}")
    for row in rows:
        growth = row['columns'] / first['columns']
        print(f"{row['devices']:>7} {row['columns']:>7} {row['gflop_per_device']:9.2f} "
              f"{row['temp_mib']:9.1f} {row['argument_mib']:9.1f} {row['seconds'] * 1e3:8.1f} "
              f"{row['seconds_per_device'] * 1e3:7.1f} "
              f"{row['gflop_per_device'] / row['seconds_per_device']:7.1f} | "
              f"{growth:8.1f} {growth ** 2:9.1f} "
              f"{row['temp_mib'] / first['temp_mib']:6.2f} "
              f"{row['gflop_per_device'] / first['gflop_per_device']:6.2f} "
              f"{row['seconds_per_device'] / first['seconds_per_device']:9.2f}")
    print(f"(device counts timed in turns; load average {timing['load_average'][0]:.1f})")
    print(json.dumps({'benchmark': 'loss_scaling', 'batch_per_device': args.batch,
                      'top_k': args.top_k, 'load_average': timing['load_average'],
                      'rows': rows}))


if __name__ == '__main__':
    main()
