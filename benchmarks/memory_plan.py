r"""Pod-scale plan: the ViT-S/B/L train steps compiled for TPU v5e-64 and v4-64, not run.

  python benchmarks/memory_plan.py [--task pretrain|finetune] \
    [--variants vit_small vit_base vit_large] [--topologies v5e-64 v4-64] \
    [--layouts replicated sharded] [--remat no yes] [--images_per_core 198] \
    [--platform tpu|cpu]
  python benchmarks/memory_plan.py --rows LOG [LOG ...]  # the table of earlier runs' rows

The paper's runs (`configs/vit_small_imagenet.py`, `configs/vit_base_imagenet.py`; ViT-L
is the ViT-B config resized to 1024 wide, 24 blocks, 16 heads, there being no ViT-L
config): global batch 4096, 2×224 + 6×96 crops, AdamW, teacher, fed as a user's run feeds
them (uint8 crops and a seed per image; the photometric augmentations run in the step).
The state and the batch are abstract (`jax.ShapeDtypeStruct` with shardings), so nothing
is allocated or run: the step `bam_jax.train.builder.build_training` builds for the
topology's devices is lowered and compiled by libtpu's compiler, which runs on a CPU-only
host, with the activations in bfloat16 as `compute_dtype='auto'` makes them on a TPU.
Every variant × topology × layout (`config.shard_state`) × `config.model.remat`.

`--task finetune` plans fine-tuning's step instead (`configs/finetune_imagenet.py`, DeiT's
recipe; ViT-B and ViT-L resized from it as above): global batch 1024 of one uint8 224 px
crop and a label each, a 1000-class head, random erasing, mixup / CutMix and drop path in
the step, AdamW over every parameter. The state and step are what the task builds
(`bam_jax.train.tasks.abstract_training`), so either task is the loop's own step.

From the compiled SPMD program (the program of one chip):
- memory per chip, `memory_analysis()`: arguments (the state, replicated or sharded, +
  this chip's crops) + outputs not aliased to the donated arguments + temporaries
  (activations kept for the backward pass, scratch); against the chip's HBM;
- FLOPs and bytes accessed per step, `cost_analysis()` (XLA's count, remat's recomputation
  included), per chip and over all chips;
- the roofline step time at the chip's peak, max(FLOPs / peak, bytes / bandwidth), and
  the images/s it implies per chip and per host: an upper bound (no communication, no
  stalls, the MXUs at full rate);
- the host CPU cores the input pipeline needs to keep up: images/s per host over the
  pipeline's images/s per core (`--images_per_core`: pretraining's 198, the bam_jax host
  part measured by `benchmarks/input_throughput.py` on one core of the development
  machine, a Zen 5 EPYC, 2026-11-22, docs/training.md; fine-tuning's host part, with
  RandAugment, is not measured, so its rows have no host cores unless it is given).

Chip figures are Google's public specifications: v5e 197 TFLOP/s bf16, 16 GiB HBM,
819 GB/s (https://cloud.google.com/tpu/docs/v5e); v4 275 TFLOP/s bf16, 32 GiB HBM,
1200 GB/s (https://cloud.google.com/tpu/docs/v4). Chips per host come from the topology's
process count: 4 for both (the v5e-64 slice as 16 ct5lp-hightpu-4t hosts; a v4 host has
4 chips). v4-64 is Cloud's name for 64 TensorCores, i.e. 32 chips (4×4×2); with megacore
(what Cloud TPU v4 runs) JAX has one device per chip, so the topology is described with
`chip_config_name='megacore'`, and each chip gets 4096 / 32 = 128 images (fine-tuning:
1024 / 32 = 32; 16 on a v5e-64).

With `--platform cpu` the step is compiled for `--devices` simulated CPU devices instead
(float32, no roofline): XLA:CPU's buffer assignment then stands in for the TPU's and
cannot show remat (docs/performance.md). Prints a table, the largest temporaries (from
XLA's memory-usage report) and one JSON line; each row is also printed to stderr as it is
compiled (`row {...}`), so a long grid leaves its rows behind, and `--rows` tabulates such
logs of several runs (several plans at once need ALLOW_MULTIPLE_LIBTPU_LOAD=1: libtpu
otherwise locks /tmp/libtpu_lockfile).
"""

import argparse
import collections
import dataclasses
import glob
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time

GIB = 2 ** 30
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_CLASSES = 1000
# Images per second of the host half of each task's input pipeline on one core. Pretraining
# (decode, 2×224 + 6×96 crops, flips): `benchmarks/input_throughput.py`, docs/training.md
# (2026-11-22). Fine-tuning's (decode, one crop, RandAugment) is not measured.
IMAGES_PER_CORE = {'pretrain': 198.0, 'finetune': None}


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU slice to compile for, and its chips' public peak figures."""
    topology: str  # as `jax.experimental.topologies.get_topology_desc` takes it
    options: tuple = ()  # its keyword arguments, as (name, value) pairs
    hbm_gib: float = 16.0
    peak_flops: float = 197e12  # bf16 FLOP/s per chip
    hbm_bytes_per_s: float = 819e9


TOPOLOGIES = {
    'v5e-64': Chip('v5e:8x8', hbm_gib=16, peak_flops=197e12, hbm_bytes_per_s=819e9),
    'v4-64': Chip('v4:4x4x2', (('chip_config_name', 'megacore'),), hbm_gib=32,
                  peak_flops=275e12, hbm_bytes_per_s=1200e9),
}
# Per task, (config module, `config.model` overrides) per backbone: ViT-B/16 fine-tuning as
# `configs/finetune_imagenet.py` says, ViT-L/16 as in the ViT paper (Table 1).
VIT_BASE = dict(variant='base', embed_dim=768, depth=12, num_heads=12)
VIT_LARGE = dict(VIT_BASE, embed_dim=1024, depth=24, num_heads=16)
CONFIGS = {
    'pretrain': {'vit_small': ('vit_small_imagenet', {}),
                 'vit_base': ('vit_base_imagenet', {}),
                 'vit_large': ('vit_base_imagenet', VIT_LARGE)},
    'finetune': {'vit_small': ('finetune_imagenet', {}),
                 'vit_base': ('finetune_imagenet', VIT_BASE),
                 'vit_large': ('finetune_imagenet', VIT_LARGE)},
}
VARIANTS = tuple(CONFIGS['pretrain'])
LABELS = {'vit_small': 'ViT-S/16', 'vit_base': 'ViT-B/16', 'vit_large': 'ViT-L/16'}


def _set_xla_flags(n_devices: int, dump_dir: str) -> None:
    """Simulated devices, a memory-minimising schedule and XLA's dumps; before JAX loads.

    XLA:CPU's default scheduler favours running ops concurrently; the TPU compiler's
    schedules for memory, so the CPU plan asks for that too.
    """
    os.environ['XLA_FLAGS'] = ' '.join([
        os.environ.get('XLA_FLAGS', ''),
        f'--xla_force_host_platform_device_count={n_devices}',
        '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED',
        f'--xla_dump_to={dump_dir}', '--xla_dump_hlo_module_re=.*train_step.*'])
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def largest_temporaries(dump_dir: str | None, top: int = 6) -> list[tuple[str, float]]:
    """(shape, GiB) of the largest temporary buffers in XLA's last memory-usage report."""
    reports = sorted(glob.glob(f'{dump_dir}/*train_step*memory-usage-report.txt'),
                     key=os.path.getmtime) if dump_dir else []
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


def tpu_devices(chip: Chip) -> list:
    """The compile-only devices of a TPU topology (one per chip with megacore)."""
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(topology_name=chip.topology, platform='tpu',
                                            **dict(chip.options)).devices
    except Exception as error:  # noqa: BLE001  (libtpu missing or a bad name)
        sys.exit(f'cannot describe TPU topology {chip.topology!r}: {error}\n'
                 'TPU compiles need libtpu, the version jax[tpu] pins for this jax '
                 '(pip install "jax[tpu]==<the jax version>"); or use --platform cpu.')


def data_mesh(devices):
    """A 1-D 'data' mesh over `devices`."""
    import numpy as np
    from jax.sharding import AxisType, Mesh
    return Mesh(np.asarray(devices), ('data',), axis_types=(AxisType.Auto,))


def variant_config(variant: str, remat: bool, shard_state: bool, task: str = 'pretrain'):
    """The paper config of `task` for `variant` (ViT-L: ViT-B's, resized), remat and
    layout set; fine-tuning's head has ImageNet's classes (no data is opened to count)."""
    import importlib
    module, overrides = CONFIGS[task][variant]
    config = importlib.import_module(f'configs.{module}').get_config()
    config.model.update(overrides)
    if task == 'finetune':
        config.num_classes = IMAGENET_CLASSES
    config.model.remat = remat
    config.shard_state = shard_state
    return config


def roofline(flops: float, bytes_accessed: float, images_per_chip: float, chip: Chip,
             chips_per_host: int, images_per_core: float | None) -> dict:
    """Step time at the chip's peak (compute or HBM bound) and the rates it implies (the
    host cores only with a measured `images_per_core`)."""
    compute_s, memory_s = flops / chip.peak_flops, bytes_accessed / chip.hbm_bytes_per_s
    step_s = max(compute_s, memory_s)
    per_chip = images_per_chip / step_s
    return dict(roofline_step_s=step_s, compute_step_s=compute_s, hbm_step_s=memory_s,
                bound='compute' if compute_s >= memory_s else 'HBM',
                arithmetic_intensity=flops / bytes_accessed,
                images_per_s_per_chip=per_chip,
                images_per_s_per_host=per_chip * chips_per_host,
                host_cores_needed=(per_chip * chips_per_host / images_per_core
                                   if images_per_core else None))


def cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program (a dict; a one-element list in old jax)."""
    analysis = compiled.cost_analysis()
    return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def abstract_batch(config, mesh) -> dict:
    """The step's input as a user's run feeds it, shapes and shardings only: uint8 crops
    and a seed per image (pretraining), or one uint8 crop and a label (fine-tuning)."""
    import jax
    import jax.numpy as jnp

    from bam_jax.train import builder
    from bam_jax.train.step import batch_sharding
    from bam_jax.train.tasks import task_name

    images = config.batch_size
    if task_name(config) == 'finetune':
        size = config.input.image_size
        shapes = {'image': ((images, size, size, 3), jnp.uint8),
                  'label': ((images,), jnp.int32)}
    else:
        shapes = {group: (shape, jnp.uint8) for group, shape in
                  zip(('global', 'local'), builder.crop_shapes(config, images))}
        shapes['seed'] = ((images, 2), jnp.uint32)
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, key))
            for key, (shape, dtype) in shapes.items()}


def plan(config, mesh, chip: Chip | None = None, images_per_core: float | None = None,
         dump_dir: str | None = None) -> dict:
    """Compile `config`'s train step (its task's) for `mesh` from abstract inputs; its
    plan per chip. `images_per_core`: the task's measured figure when None."""
    import jax

    from bam_jax.models.multicrop import compute_dtype
    from bam_jax.train.tasks import abstract_training, task_name

    task = task_name(config)
    images_per_core = images_per_core or IMAGES_PER_CORE[task]
    n_devices = mesh.devices.size
    platform = mesh.devices.flat[0].platform
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // config.batch_size
    training = abstract_training(config, mesh, steps_per_epoch)
    batch = abstract_batch(config, mesh)
    state_bytes = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(training.state))  # on one device
    images_per_chip = config.batch_size / n_devices
    row = dict(task=task, embed_dim=config.model.embed_dim, depth=config.model.depth,
               remat=bool(config.model.remat), shard_state=bool(config.shard_state),
               platform=platform, devices=n_devices,
               compute_dtype=str(compute_dtype(config, platform)),
               images_per_chip=images_per_chip, state_gib=state_bytes / GIB)
    start = time.perf_counter()
    try:
        compiled = training.train_step.lower(training.state, batch).compile()
    except jax.errors.JaxRuntimeError as error:
        # libtpu refuses a program whose temporaries exceed the chip's HBM: a row that
        # does not fit, with what the compiler says it needs, and the grid goes on.
        refusal = [line.strip() for line in str(error).splitlines()
                   if 'RESOURCE_EXHAUSTED' in line and 'HLO temporaries (' in line]
        if chip is None or not refusal:
            raise
        needed = re.search(r'HLO temporaries \(([\d.]+)G\)', refusal[0]).group(1)
        return dict(row, compile_seconds=time.perf_counter() - start,
                    temp_gib=float(needed), hbm_gib=chip.hbm_gib, fits=False,
                    refused=refusal[0])
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    costs = cost(compiled)
    flops, bytes_accessed = float(costs['flops']), float(costs['bytes accessed'])
    # Remat shows as more matmuls (the forward recomputed).
    n_matmuls = len(re.findall(r' (?:dot|convolution)\(', compiled.as_text()))
    batch_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in batch.values())
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    row.update(compile_seconds=compile_seconds, matmul_ops=n_matmuls,
               batch_gib=batch_bytes / n_devices / GIB,
               argument_gib=memory.argument_size_in_bytes / GIB,
               output_not_aliased_gib=(memory.output_size_in_bytes
                                       - memory.alias_size_in_bytes) / GIB,
               temp_gib=memory.temp_size_in_bytes / GIB, total_gib=total / GIB,
               peak_gib=memory.peak_memory_in_bytes / GIB,
               flops_per_chip=flops, bytes_per_chip=bytes_accessed,
               flops_total=flops * n_devices, bytes_total=bytes_accessed * n_devices,
               largest_temporaries=largest_temporaries(dump_dir))
    if chip is not None:
        chips_per_host = n_devices // len({device.process_index
                                           for device in mesh.devices.flat})
        row.update(hbm_gib=chip.hbm_gib, fits=total <= chip.hbm_gib * GIB,
                   chips_per_host=chips_per_host,
                   **roofline(flops, bytes_accessed, images_per_chip, chip, chips_per_host,
                              images_per_core))
    return row


def saved_rows(logs: list[str], images_per_core: float | None) -> list[dict]:
    """The rows earlier runs printed to stderr, the roofline re-derived from their costs
    (rows from before `--task` are pretraining's)."""
    rows = []
    for log in logs:
        with open(log) as lines:
            rows += [{'task': 'pretrain', **json.loads(line[4:])}
                     for line in lines if line.startswith('row {')]
    for row in rows:
        if row['target'] in TOPOLOGIES and 'flops_per_chip' in row:
            row.update(roofline(row['flops_per_chip'], row['bytes_per_chip'],
                                row['images_per_chip'], TOPOLOGIES[row['target']],
                                row['chips_per_host'],
                                images_per_core or IMAGES_PER_CORE[row['task']]))
    order = {name: index for index, name in enumerate([*CONFIGS, *TOPOLOGIES, *VARIANTS])}
    return sorted(rows, key=lambda row: (order[row['task']], order.get(row['target'], 99),
                                         order[row['variant']], row['shard_state'],
                                         row['remat']))


def print_table(rows: list[dict]) -> None:
    print("Per chip, one train step at the config's global batch (pretrain: 2×224 + 6×96 "
          'crops; finetune: one 224 crop and a label), compiled, not run; roofline = '
          'max(FLOPs / peak, bytes / HBM bandwidth)')
    print(f"{'task':<8} {'batch':>5} {'target':<8} {'backbone':<9} {'state':<5} "
          f"{'remat':<5} {'dtype':<8} "
          f"{'state':>6} {'temp':>6} {'GiB':>6} {'fits':>4} {'TFLOP':>6} {'GB':>6} "
          f"{'MXU ms':>6} {'HBM ms':>6} {'img/s/chip':>10} {'img/s/host':>10} "
          f"{'cores':>5} {'compile s':>9}")
    for row in rows:
        task = f"{row['task']:<8} {round(row['images_per_chip'] * row['devices']):5d}"
        if 'refused' in row:  # not compiled: does not fit
            print(f"{task} {row['target']:<8} "
                  f"{LABELS.get(row['variant'], row['variant']):<9} "
                  f"{'shard' if row['shard_state'] else 'repl':<5} "
                  f"{'yes' if row['remat'] else 'no':<5} {row['compute_dtype']:<8} "
                  f"{row['state_gib']:6.2f} {row['temp_gib']:6.2f} {'':>6} {'NO':>4}  "
                  f"refused by the compiler: {row['refused']}")
            continue
        roof = 'roofline_step_s' in row
        cells = [task, f"{row['target']:<8}",
                 f"{LABELS.get(row['variant'], row['variant']):<9}",
                 f"{'shard' if row['shard_state'] else 'repl':<5}",
                 f"{'yes' if row['remat'] else 'no':<5}", f"{row['compute_dtype']:<8}",
                 f"{row['state_gib']:6.2f}", f"{row['temp_gib']:6.2f}",
                 f"{row['total_gib']:6.2f}",
                 f"{('yes' if row['fits'] else 'NO') if roof else '':>4}",
                 f"{row['flops_per_chip'] / 1e12:6.2f}", f"{row['bytes_per_chip'] / 1e9:6.1f}",
                 f"{row['compute_step_s'] * 1e3:6.1f}" if roof else f"{'':>6}",
                 f"{row['hbm_step_s'] * 1e3:6.1f}" if roof else f"{'':>6}",
                 f"{row['images_per_s_per_chip']:10.0f}" if roof else f"{'':>10}",
                 f"{row['images_per_s_per_host']:10.0f}" if roof else f"{'':>10}",
                 f"{row['host_cores_needed']:5.1f}"
                 if roof and row['host_cores_needed'] else f"{'':>5}",
                 f"{row['compile_seconds']:9.0f}"]
        print(' '.join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--task', choices=CONFIGS, default='pretrain',
                        help="the step to plan (config.task): 'pretrain' with the "
                             "pretraining configs, 'finetune' with finetune_imagenet.py")
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--topologies', nargs='+', default=list(TOPOLOGIES),
                        choices=TOPOLOGIES)
    parser.add_argument('--layouts', nargs='+', default=['replicated', 'sharded'],
                        choices=['replicated', 'sharded'],
                        help='the state replicated, or sharded (config.shard_state)')
    parser.add_argument('--remat', nargs='+', default=['no', 'yes'], choices=['no', 'yes'],
                        help='config.model.remat')
    parser.add_argument('--images_per_core', type=float,
                        help="input pipeline images/s per host core (default: the task's "
                             'measured figure, none for fine-tuning)')
    parser.add_argument('--platform', choices=('tpu', 'cpu'), default='tpu')
    parser.add_argument('--devices', type=int, default=64,
                        help='simulated CPU devices (--platform cpu)')
    parser.add_argument('--rows', nargs='+', metavar='LOG',
                        help="compile nothing: the table of the 'row {...}' lines these "
                             'stderr logs of earlier runs hold (roofline re-derived)')
    args = parser.parse_args()
    if args.rows:
        print_table(saved_rows(args.rows, args.images_per_core))
        return
    dump_dir = tempfile.mkdtemp(prefix='memory_plan_')
    _set_xla_flags(args.devices, dump_dir)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    import jax

    if args.platform == 'cpu':
        targets = {f'cpu-{args.devices}': (None, data_mesh(jax.devices()[:args.devices]))}
    else:
        targets = {name: (TOPOLOGIES[name], data_mesh(tpu_devices(TOPOLOGIES[name])))
                   for name in args.topologies}
    rows = []
    for variant, target, layout, remat in itertools.product(
            args.variants, targets, args.layouts, args.remat):
        chip, mesh = targets[target]
        config = variant_config(variant, remat == 'yes', layout == 'sharded', args.task)
        row = dict(variant=variant, target=target,
                   **plan(config, mesh, chip, args.images_per_core, dump_dir))
        rows.append(row)
        print('row', json.dumps(row), file=sys.stderr, flush=True)
    print_table(rows)
    for row in rows:
        if row.get('largest_temporaries'):
            print(f"\nlargest temporaries, {row['target']} {row['variant']} "
                  f"shard_state={row['shard_state']} remat={row['remat']}:")
            for shape, gib in row['largest_temporaries']:
                print(f'  {gib:6.2f} GiB  {shape}')
    print(json.dumps({'benchmark': 'memory_plan', 'images_per_core': args.images_per_core,
                      'load_average_1min': os.getloadavg()[0], 'rows': rows}))


if __name__ == '__main__':
    main()
