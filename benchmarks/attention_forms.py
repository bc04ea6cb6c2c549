r"""The ViT's two attention forms side by side: compiled for a TPU, and timed on this CPU.

  pip install -r requirements-tpu.txt  # libtpu: compiles for a TPU topology on any host
  python benchmarks/attention_forms.py [--topology v5e:2x2] [--images 64] \
    [--scopes attention vit] [--repeats 10]

The forms (`config.model.attention`, `bam_jax/models/vit.py::self_attention`):
'einsum', written out for the CPU (scale on q, softmax normalised after the product with
v), and 'dot_product_attention', `jax.nn.dot_product_attention`, which 'auto' picks on
TPU and GPU. Each is compiled, not run, for the chips of a TPU topology with libtpu's
compiler, at `--images` images per chip with the paper's crops (2×224 + 6×96 per image:
128 sequences of 197 tokens and 384 of 37), in float32 and bfloat16:
- scope 'attention': one ViT-S/16 attention (12 heads of 32) forward + backward w.r.t.
  its qkv, on every crop of the chip;
- scope 'vit': the whole ViT-S/16 backbone forward + backward w.r.t. its parameters, as
  `build_network` builds it from `configs/vit_small_imagenet.py`.
Per chip: the compiled memory (`memory_analysis()`: temporaries, and arguments + outputs
+ temporaries) and XLA's cost analysis (FLOPs, bytes accessed). Then both forms'
attention forward + backward is timed on this CPU in float32 on a small shape (the
crops of 8 images), in turns, best of `--repeats`. Prints a table and one JSON line.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compiling needs no TPU, so let this process load libtpu while another holds its lock.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import _peak  # noqa: E402
from bam_jax.models import multicrop  # noqa: E402
from bam_jax.models.vit import self_attention  # noqa: E402
from configs import vit_small_imagenet  # noqa: E402
from memory_plan import Chip, data_mesh, tpu_devices  # noqa: E402

FORMS = {'einsum': 'einsum', 'dot_product_attention': 'xla'}  # config value → TPU impl.
DTYPES = ('float32', 'bfloat16')
GIB = 2 ** 30


def vit_small_config(form: str, dtype: str):
    config = vit_small_imagenet.get_config()
    config.model.attention = form
    config.compute_dtype = dtype
    return config


def crop_sequences(config, images: int) -> list[tuple[int, int]]:
    """(sequences, tokens) of one attention layer over `images` images' crops."""
    crops, patch = config.crops, config.model.patch_size
    return [(images * crops.n_global, 1 + (crops.global_size // patch) ** 2),
            (images * crops.n_local, 1 + (crops.local_size // patch) ** 2)]


def attention_step(implementation: str, config, images: int, dtype, sharding=None):
    """Forward + backward of one attention layer on the crops; and its abstract inputs."""
    heads = config.model.num_heads
    head_dim = config.model.embed_dim // heads

    def step(groups):
        def forward(groups):
            return sum(jnp.sum(self_attention(qkv, implementation)[0].astype(jnp.float32))
                       for qkv in groups)
        return jax.value_and_grad(forward)(groups)

    groups = [jax.ShapeDtypeStruct((n, tokens, 3, heads, head_dim), dtype, sharding=sharding)
              for n, tokens in crop_sequences(config, images)]
    return step, (groups,)


def vit_step(form: str, config, images: int, platform: str, sharding, replicated):
    """Forward + backward of the ViT-S/16 backbone on the crops; and its abstract inputs."""
    backbone = multicrop.build_network(config, platform).backbone
    crops = config.crops
    shapes = [(images * crops.n_global, crops.global_size, crops.global_size, 3),
              (images * crops.n_local, crops.local_size, crops.local_size, 3)]
    params = jax.eval_shape(backbone.init, jax.random.key(0),
                            jnp.zeros((1, crops.global_size, crops.global_size, 3)))
    params = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=replicated), params)

    def step(variables, groups):
        def forward(variables):
            return sum(jnp.sum(backbone.apply(variables, group).astype(jnp.float32))
                       for group in groups)
        return jax.value_and_grad(forward)(variables)

    groups = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding) for shape in shapes]
    return step, (params, groups)


def compiled_costs(step, args) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return dict(temp_gib=memory.temp_size_in_bytes / GIB, total_gib=total / GIB,
                gflop=cost['flops'] / 1e9, gb_accessed=cost['bytes accessed'] / 1e9,
                compile_seconds=seconds)


def tpu_rows(args) -> tuple[str, list[dict]]:
    mesh = data_mesh(tpu_devices(Chip(args.topology)))
    platform = mesh.devices.flat[0].platform
    chips = mesh.devices.size
    sharding = NamedSharding(mesh, P('data'))
    rows = []
    for scope in args.scopes:
        for dtype in DTYPES:
            for form, implementation in FORMS.items():
                config = vit_small_config(form, dtype)
                assert multicrop.attention_implementation(config, platform) == implementation
                if scope == 'attention':
                    step, inputs = attention_step(implementation, config, args.images * chips,
                                                  jnp.dtype(dtype), sharding)
                else:
                    step, inputs = vit_step(form, config, args.images * chips, platform,
                                            sharding, NamedSharding(mesh, P()))
                rows.append(dict(scope=scope, dtype=dtype, form=form,
                                 **compiled_costs(step, inputs)))
                print(f'compiled {scope} {dtype} {form}: '
                      f"{rows[-1]['compile_seconds']:.0f} s", file=sys.stderr, flush=True)
    return f'TPU {args.topology} ({chips} chips, {mesh.devices.flat[0].device_kind})', rows


def cpu_times(args) -> dict:
    """Both forms' attention forward + backward on this CPU, float32, timed in turns."""
    config = vit_small_config('einsum', 'float32')
    runners, flops = {}, None
    for form, implementation in (('einsum', 'einsum'), ('dot_product_attention', 'xla')):
        step, (abstract,) = attention_step(implementation, config, args.cpu_images,
                                           jnp.float32)
        groups = [jax.random.normal(jax.random.key(i), group.shape, group.dtype)
                  for i, group in enumerate(abstract)]
        compiled = jax.jit(step).lower(groups).compile()
        flops = compiled.cost_analysis()['flops'] if flops is None else flops
        jax.block_until_ready(compiled(groups))
        runners[form] = (lambda compiled=compiled, groups=groups:
                         jax.block_until_ready(compiled(groups)))
    best = {form: float('inf') for form in runners}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for form, run in runners.items():
            best[form] = min(best[form], _peak.best_seconds(run, 1))
    return dict(images=args.cpu_images, shapes=crop_sequences(config, args.cpu_images),
                seconds=best, gflop=flops / 1e9,
                load_average=[load_before, os.getloadavg()[0]])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--topology', default='v5e:2x2', help='TPU topology to compile for')
    parser.add_argument('--images', type=int, default=64, help='images per chip')
    parser.add_argument('--scopes', nargs='+', default=['attention', 'vit'],
                        choices=['attention', 'vit'])
    parser.add_argument('--cpu_images', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=10)
    args = parser.parse_args()

    target, rows = tpu_rows(args)
    cpu = cpu_times(args)
    print(f'ViT-S/16 attention forms compiled for {target}, {args.images} images per chip '
          f'(2×224 + 6×96 crops), forward + backward; per chip, not run')
    print(f"{'scope':<10} {'dtype':<9} {'form':<22} {'temp GiB':>8} {'total GiB':>9} "
          f"{'GFLOP':>8} {'GB accessed':>11} {'compile s':>9}")
    for row in rows:
        print(f"{row['scope']:<10} {row['dtype']:<9} {row['form']:<22} "
              f"{row['temp_gib']:8.2f} {row['total_gib']:9.2f} {row['gflop']:8.1f} "
              f"{row['gb_accessed']:11.2f} {row['compile_seconds']:9.0f}")
    seconds = cpu['seconds']
    print(f"\nCPU, float32, attention forward + backward on {cpu['images']} images' crops "
          f"({cpu['gflop']:.2f} GFLOP), best of {args.repeats} in turns "
          f"(load average {cpu['load_average'][0]:.1f}-{cpu['load_average'][1]:.1f}):")
    for form, value in seconds.items():
        print(f'  {form:<22} {value * 1e3:8.1f} ms  '
              f"({value / seconds['einsum']:.2f}× einsum)")
    print(json.dumps({'benchmark': 'attention_forms', 'target': target,
                      'images_per_chip': args.images, 'rows': rows, 'cpu': cpu}))


if __name__ == '__main__':
    main()
