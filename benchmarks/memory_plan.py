r"""Pod-scale memory plan: the ViT-S/16 and ViT-B/16 train steps compiled for 64 devices, not run.

  python benchmarks/memory_plan.py [--variants vit_small vit_base] [--devices 64] \
    [--shard_state]

The paper's runs (`configs/vit_small_imagenet.py`, `configs/vit_base_imagenet.py`):
global batch 4096, 2×224 + 6×96 crops, fp32, AdamW, teacher, sharded over 64 simulated
CPU devices (64 images per device, as on a v5e-64 slice). The state and the batch are
abstract (`jax.ShapeDtypeStruct` with shardings), so nothing is allocated or run; the
step built by `bam_jax.train.builder.build_training` is lowered and compiled, and
`memory_analysis()` of the compiled SPMD program gives the per-device bytes. Each is
compiled with and without rematerialisation of the blocks (`config.model.remat`).

Per device = arguments (the state, replicated or with --shard_state split over the
devices, + this device's crops) + outputs not aliased to the donated arguments +
temporaries (activations kept for the backward pass, and scratch). XLA:CPU's buffer
assignment stands in for the TPU's: the TPU compiler fuses and schedules differently
and pads the minor dimensions of its tiles. The largest temporaries are read from XLA's
memory-usage report. Prints a table and one JSON line.
"""

import argparse
import collections
import glob
import json
import math
import os
import re
import sys
import tempfile
import time

DUMP_DIR = tempfile.mkdtemp(prefix='memory_plan_')


def _set_xla_flags(n_devices: int) -> None:
    """Simulated devices, a memory-minimising schedule and XLA's dumps; before JAX loads.

    XLA:CPU's default scheduler favours running ops concurrently; the TPU compiler's
    schedules for memory, so the CPU plan asks for that too.
    """
    os.environ['XLA_FLAGS'] = ' '.join([
        os.environ.get('XLA_FLAGS', ''),
        f'--xla_force_host_platform_device_count={n_devices}',
        '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED',
        f'--xla_dump_to={DUMP_DIR}', '--xla_dump_hlo_module_re=.*train_step.*'])
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')


GIB = 2 ** 30
BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'pred': 1, 'bf16': 2, 'f16': 2, 'u8': 1, 's8': 1}


def largest_temporaries(top: int = 6) -> list[tuple[str, float]]:
    """(shape, GiB) of the largest temporary buffers in XLA's memory-usage report."""
    reports = sorted(glob.glob(f'{DUMP_DIR}/*train_step*memory-usage-report.txt'),
                     key=os.path.getmtime)
    if not reports:
        return []
    per_shape = collections.Counter()
    with open(reports[-1]) as report:
        for line in report:
            fields = [field.strip() for field in line.split(';')]
            if len(fields) != 5 or not fields[2].isdigit():
                continue
            size = re.match(r'([\d.]+)([KMGT]?)i?B', fields[1])
            if size:
                scale = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}
                per_shape[fields[4][:60]] += float(size.group(1)) * scale[size.group(2)]
    return [(shape, size / GIB) for shape, size in per_shape.most_common(top)]


def make_mesh(platform: str, n_devices: int, topology: str):
    """A 1-D 'data' mesh: simulated CPU devices, or the chips of a TPU topology."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    if platform == 'cpu':
        return jax.make_mesh((n_devices,), ('data',), axis_types=(AxisType.Auto,))
    from jax.experimental import topologies
    try:
        devices = topologies.get_topology_desc(topology_name=topology, platform='tpu').devices
    except Exception as error:  # noqa: BLE001  (libtpu missing or a bad name)
        sys.exit(f'cannot describe TPU topology {topology!r}: {error}\n'
                 'TPU compiles need libtpu, the version jax[tpu] pins for this jax '
                 '(pip install "jax[tpu]==<the jax version>"); or use --platform cpu.')
    return Mesh(np.asarray(devices), ('data',), axis_types=(AxisType.Auto,))


def plan(variant: str, remat: bool, mesh, shard_state: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bam_jax.train import builder
    from configs import vit_base_imagenet, vit_small_imagenet

    config = {'vit_small': vit_small_imagenet, 'vit_base': vit_base_imagenet}[
        variant].get_config()
    config.model.remat = remat
    config.shard_state = shard_state
    n_devices = mesh.devices.size
    steps_per_epoch = 1_281_167 // config.batch_size
    training = builder.build_training(config, mesh, steps_per_epoch, abstract=True)
    images = NamedSharding(mesh, P(None, 'data'))
    batch = {group: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=images)
             for group, shape in zip(('global', 'local'),
                                     builder.crop_shapes(config, config.batch_size))}
    start = time.perf_counter()
    compiled = training.train_step.lower(training.state, batch).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    # Remat shows as more matmuls (the forward recomputed); XLA:CPU merges them back.
    n_matmuls = len(re.findall(r' (?:dot|convolution)\(', compiled.as_text()))
    state_bytes = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(training.state))  # on one device
    batch_bytes = sum(x.size * x.dtype.itemsize for x in batch.values()) / n_devices
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return dict(variant=variant, remat=remat, shard_state=shard_state, devices=n_devices,
                images_per_device=config.batch_size // n_devices,
                compile_seconds=compile_seconds, matmul_ops=n_matmuls,
                state_gib=state_bytes / GIB, batch_gib=batch_bytes / GIB,
                argument_gib=memory.argument_size_in_bytes / GIB,
                output_not_aliased_gib=(memory.output_size_in_bytes
                                        - memory.alias_size_in_bytes) / GIB,
                temp_gib=memory.temp_size_in_bytes / GIB, total_gib=total / GIB,
                fits_16_gib=total <= 16 * GIB, largest_temporaries=largest_temporaries())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variants', nargs='+', default=['vit_small', 'vit_base'],
                        choices=['vit_small', 'vit_base'])
    parser.add_argument('--platform', choices=('cpu', 'tpu'), default='cpu')
    parser.add_argument('--devices', type=int, default=64, help='simulated CPU devices')
    parser.add_argument('--topology', default='v5e:8x8', help='TPU topology to compile for')
    parser.add_argument('--shard_state', action='store_true',
                        help='the state sharded over the devices (config.shard_state)')
    args = parser.parse_args()
    _set_xla_flags(args.devices)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

    mesh = make_mesh(args.platform, args.devices, args.topology)
    target = (f'{args.devices} simulated CPU devices' if args.platform == 'cpu' else
              f'TPU {args.topology} ({mesh.devices.size} chips)')
    rows = [dict(plan(variant, remat, mesh, args.shard_state), platform=args.platform,
                 target=target)
            for variant in args.variants for remat in (False, True)]
    print(f"Per-device memory of the train step, global batch 4096 on {target}, "
          f"2×224 + 6×96 crops, fp32 (compiled, not run)")
    print(f"{'variant':<10} {'remat':<6} {'state':>6} {'crops':>6} {'temp':>6} "
          f"{'total GiB':>9} {'≤ 16 GiB':>8} {'matmul ops':>10} {'compile s':>9}")
    for row in rows:
        print(f"{row['variant']:<10} {str(row['remat']):<6} {row['state_gib']:6.2f} "
              f"{row['batch_gib']:6.2f} {row['temp_gib']:6.2f} {row['total_gib']:9.2f} "
              f"{'yes' if row['fits_16_gib'] else 'NO':>8} {row['matmul_ops']:>10} "
              f"{row['compile_seconds']:9.0f}")
    for row in rows:
        if row['largest_temporaries']:
            print(f"\nlargest temporaries, {row['variant']} remat={row['remat']}:")
            for shape, gib in row['largest_temporaries']:
                print(f"  {gib:6.2f} GiB  {shape}")
    print(json.dumps({'benchmark': 'memory_plan', 'rows': rows}))


if __name__ == '__main__':
    main()
