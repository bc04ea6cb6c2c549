r"""The tiny train step's matrix products alone, in XLA and in PyTorch: a floor under its time.

  python benchmarks/matmul_floor.py [--repeats 10]

Issue 15 asks for the tiny step (`train_step.py --configs tiny`) to be 1.2× faster than
the same work in PyTorch (`torch_step.py`). This finds every matrix product of that step,
the `dot_general`s of its traced program (student forward and backward, teacher, loss),
writes each as a plain GEMM `[B, M, K] × [B, K, N]`, and times it alone on this machine,
in XLA and in PyTorch, computing C or Cᵀ, whichever is faster. Summed over the step, that
is the least time either can take for the step with everything else (GELU, softmax,
LayerNorm, copies, the optimizer) free. PyTorch's whole step is timed after, and the table
says how much time the XLA floor leaves for everything else within the target.

The PyTorch products run in a subprocess of this script that never imports JAX
(`--torch`, the products as JSON on stdin). Prints the table and one JSON line.
"""

import argparse
import collections
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import _peak  # noqa: E402  (NumPy only)

TARGET_SPEEDUP = 1.2  # issue 15: bam-jax's step 1.2× faster than PyTorch's


def gemm_shape(lhs, rhs, dimension_numbers) -> tuple[int, int, int, int]:
    """A `dot_general`'s (B, M, K, N): batch, lhs free, contracted and rhs free sizes."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    size = lambda shape, axes: int(np.prod([shape[axis] for axis in axes]))
    free = lambda shape, contract, batch: [axis for axis in range(len(shape))
                                           if axis not in (*contract, *batch)]
    return (size(lhs, lhs_batch), size(lhs, free(lhs, lhs_contract, lhs_batch)),
            size(lhs, lhs_contract), size(rhs, free(rhs, rhs_contract, rhs_batch)))


def step_gemms(config) -> dict[tuple[int, int, int, int], int]:
    """(B, M, K, N) → how many times the train step of `config` computes that product.

    The step is traced, not run: shapes only, on pre-augmented float crops as
    `train_step.py` times it.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType
    from bam_jax.train import builder
    from bam_jax.train.step import batch_sharding

    mesh = jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:1])
    training = builder.build_training(config, mesh, steps_per_epoch=1000, abstract=True)
    batch = {group: jax.ShapeDtypeStruct(shape, jnp.float32,
                                         sharding=batch_sharding(mesh, group))
             for group, shape in zip(('global', 'local'),
                                     builder.crop_shapes(config, config.batch_size))}
    gemms = collections.Counter()

    def visit(jaxpr):
        for equation in jaxpr.eqns:
            if equation.primitive.name == 'dot_general':
                gemms[gemm_shape(*(variable.aval.shape for variable in equation.invars),
                                 equation.params['dimension_numbers'])] += 1
            for param in equation.params.values():  # pjit, custom_vjp, remat, shard_map
                for inner in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(inner, 'jaxpr', inner)
                    if hasattr(inner, 'eqns'):
                        visit(inner)

    visit(training.train_step.trace(training.state, batch).jaxpr.jaxpr)
    return dict(gemms)


def product_seconds(gemms, repeats: int, operand, product) -> list[float]:
    """Best time of each product alone, C or Cᵀ (C = A·B), whichever is faster.

    `operand(shape)` makes a random fp32 array, `product(a, b)` multiplies and waits.
    """
    seconds = []
    for batch, m, k, n in gemms:
        best = float('inf')
        for rows, columns in ((m, n), (n, m)):
            a, b = operand((batch, rows, k)), operand((batch, k, columns))
            product(a, b)  # compiles (XLA), warms up
            best = min(best, _peak.best_seconds(lambda: product(a, b), repeats))
        seconds.append(best)
    return seconds


def xla_seconds(gemms, repeats: int) -> list[float]:
    import jax
    import jax.numpy as jnp

    jitted = jax.jit(jnp.matmul)
    rng = np.random.default_rng(0)
    return product_seconds(
        gemms, repeats,
        lambda shape: jax.device_put(rng.standard_normal(shape, dtype=np.float32)),
        lambda a, b: jitted(a, b).block_until_ready())


def torch_seconds(gemms, repeats: int) -> list[float]:
    """In PyTorch (its BLAS), with all the machine's threads as torch_step.py."""
    import torch

    torch.set_num_threads(os.cpu_count())
    return product_seconds(gemms, repeats, lambda shape: torch.randn(*shape), torch.matmul)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--torch', action='store_true',
                        help='(internal) time the products read from stdin in PyTorch')
    args = parser.parse_args()
    if args.torch:
        print(json.dumps(torch_seconds(json.load(sys.stdin), args.repeats)))
        return

    import train_step  # (puts the repository on the path for bam_jax)

    gemms = step_gemms(train_step.tiny_config())
    shapes = sorted(gemms, key=lambda shape: -np.prod(shape) * gemms[shape])
    xla = xla_seconds(shapes, args.repeats)
    torch_output = subprocess.run(
        [sys.executable, __file__, '--torch', '--repeats', str(args.repeats)],
        input=json.dumps(shapes), check=True, capture_output=True, text=True).stdout
    torch = json.loads(torch_output.splitlines()[-1])
    pytorch_step = train_step.torch_step_seconds(5)

    print(f"{'B':>4} {'M':>5} {'K':>5} {'N':>5} {'count':>5} {'XLA s':>6} {'GFLOP/s':>7} "
          f"{'torch s':>7} {'GFLOP/s':>7}")
    rows = []
    for shape, xla_one, torch_one in zip(shapes, xla, torch):
        count, flops = gemms[shape], 2.0 * np.prod(shape)
        rows.append(dict(bmkn=list(shape), count=count, xla_seconds=xla_one * count,
                         torch_seconds=torch_one * count))
        print(f"{shape[0]:>4} {shape[1]:>5} {shape[2]:>5} {shape[3]:>5} {count:>5} "
              f"{xla_one * count:6.3f} {flops / xla_one / 1e9:7.0f} "
              f"{torch_one * count:7.3f} {flops / torch_one / 1e9:7.0f}")
    xla_floor = sum(row['xla_seconds'] for row in rows)
    torch_floor = sum(row['torch_seconds'] for row in rows)
    target = pytorch_step / TARGET_SPEEDUP
    gflop = sum(2.0 * np.prod(shape) * gemms[shape] for shape in shapes) / 1e9
    print(f"\n{sum(gemms.values())} products, {gflop:.1f} GFLOP a step (64 images)")
    print(f"matmul floor: XLA {xla_floor:.3f} s, PyTorch {torch_floor:.3f} s "
          f"(XLA {xla_floor / torch_floor:.2f}x PyTorch's)")
    print(f"PyTorch's whole step {pytorch_step:.3f} s, of which products at least "
          f"{torch_floor / pytorch_step:.0%}; the target, {TARGET_SPEEDUP}x faster: "
          f"{target:.3f} s")
    print(f"left for everything but the products within the target: "
          f"{target - xla_floor:.3f} s (PyTorch spends {pytorch_step - torch_floor:.3f} s)")
    print(json.dumps({'benchmark': 'matmul_floor', 'gflop': gflop,
                      'xla_floor_seconds': xla_floor, 'torch_floor_seconds': torch_floor,
                      'pytorch_step_seconds': pytorch_step, 'target_seconds': target,
                      'products': rows}))


if __name__ == '__main__':
    main()
