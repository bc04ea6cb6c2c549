r"""This machine's fp32 matmul peak: NumPy vs JAX (XLA:CPU) at 4096³, and which XLA flags matter.

  python benchmarks/matmul_peak.py [--rounds 3] [--repeats 3]

The peak every other benchmark divides by is the faster of NumPy and JAX, alternated in
one process (`benchmarks/_peak.py`). The table then times each backend variant in its own
process (XLA flags are read once, at start-up), round-robin over `--rounds` rounds so
that every variant sees the same background load, and keeps each variant's best.
The `kernel` column is read from the compiled HLO, so a flag that silently does nothing
shows up as such. Prints the table and one JSON line.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _peak  # noqa: E402

# (name, extra environment, XLA_FLAGS, what it shows). jaxlib 0.10.2 sends dots to
# YNNPACK by default; an empty `ynn_fusion_type` list turns that off, and only then do
# the Eigen, oneDNN and XNNPACK paths get the dot.
NO_YNN = '--xla_cpu_experimental_ynn_fusion_type='
VARIANTS = [
    ('numpy', {}, '', 'OpenBLAS as shipped in the NumPy wheel'),
    ('numpy, OPENBLAS_CORETYPE=SkylakeX', {'OPENBLAS_CORETYPE': 'SkylakeX'}, '',
     'OpenBLAS forced onto its AVX-512 kernels'),
    ('numpy, 1 core', {'TASKSET': '0'}, '', 'one core'),
    ('jax (default)', {}, '', 'XLA:CPU as shipped'),
    ('jax, 1 core', {'TASKSET': '0'}, '', 'one core'),
    ('jax, Eigen', {}, NO_YNN, 'YNNPACK off: the classic Eigen dot'),
    ('jax, Eigen 1 thread', {}, f'{NO_YNN} --xla_cpu_multi_thread_eigen=false',
     'Eigen without its thread pool'),
    ('jax, oneDNN', {}, f'{NO_YNN} --xla_cpu_use_onednn=true '
     '--xla_cpu_experimental_onednn_fusion_type=dot', 'oneDNN dot fusions'),
    ('jax, oneDNN flag alone', {}, f'{NO_YNN} --xla_cpu_use_onednn=true',
     'needs a fusion type too, else a no-op'),
    ('jax, XNNPACK', {}, f'{NO_YNN} --xla_cpu_use_xnnpack=true '
     '--xla_cpu_experimental_xnn_fusion_type=dot', 'no-op in this jaxlib'),
]


def kernel_of(compiled_text: str) -> str:
    """Which library XLA gave the dot to, from the optimised HLO."""
    for marker, name in (('__ynn_fusion', 'YNNPACK'), ('__xnn_fusion', 'XNNPACK'),
                         ('__onednn', 'oneDNN'), ('onednn', 'oneDNN')):
        if marker in compiled_text:
            return name
    return 'Eigen' if ' dot(' in compiled_text else 'other'


def worker(backend: str, repeats: int) -> None:
    """Times one backend in this process; prints one JSON line."""
    run = _peak.matmul_runners()[backend]
    seconds = _peak.best_seconds(run, repeats)
    if backend == 'numpy':
        kernel = numpy_blas_core()
    else:
        import jax
        import jax.numpy as jnp
        a = jax.ShapeDtypeStruct((_peak.SIZE,) * 2, jnp.float32)
        kernel = kernel_of(jax.jit(jnp.matmul).lower(a, a).compile().as_text())
    print(json.dumps({'gflops': _peak.matmul_flops() / seconds / 1e9, 'kernel': kernel}))


def numpy_blas_core() -> str:
    """OpenBLAS's kernel family for this CPU (its DYNAMIC_ARCH choice)."""
    import ctypes
    import glob
    import numpy as np
    libraries = glob.glob(os.path.join(os.path.dirname(np.__file__), '..', 'numpy.libs',
                                       '*openblas*'))
    try:
        get_corename = ctypes.CDLL(libraries[0]).scipy_openblas_get_corename64_
    except (IndexError, OSError, AttributeError):
        return 'BLAS ?'
    get_corename.restype = ctypes.c_char_p
    return 'OpenBLAS ' + get_corename().decode()


def run_variant(environment: dict, xla_flags: str, backend: str, repeats: int) -> dict:
    env = {**os.environ, **{k: v for k, v in environment.items() if k != 'TASKSET'}}
    env['XLA_FLAGS'] = xla_flags
    command = [sys.executable, __file__, '--worker', backend, '--repeats', str(repeats)]
    if 'TASKSET' in environment and shutil.which('taskset'):
        command = ['taskset', '-c', environment['TASKSET']] + command
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--worker', choices=('numpy', 'jax'))
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.repeats)

    peak = _peak.measure_peak(repeats=2 * args.repeats)
    best = {}
    for _ in range(args.rounds):
        for name, environment, flags, _ in VARIANTS:
            backend = 'numpy' if name.startswith('numpy') else 'jax'
            result = run_variant(environment, flags, backend, args.repeats)
            if result['gflops'] > best.get(name, {'gflops': 0.0})['gflops']:
                best[name] = result

    print(f'fp32 {_peak.SIZE}³ matmul, best of {args.rounds} rounds × {args.repeats}')
    print(f"{'variant':<34} {'kernel':<18} {'GFLOP/s':>8} {'/ numpy':>8}  XLA_FLAGS / note")
    numpy_gflops = best['numpy']['gflops']
    for name, _, flags, note in VARIANTS:
        result = best[name]
        print(f"{name:<34} {result['kernel']:<18} {result['gflops']:8.1f} "
              f"{result['gflops'] / numpy_gflops:8.2f}  {flags or note}")
    print(f"\nIn one process, alternated: numpy {peak['numpy_gflops']:.1f}, "
          f"jax {peak['jax_gflops']:.1f} GFLOP/s -> peak {peak['peak_gflops']:.1f} "
          f"({peak['peak_source']}); load average {peak['load_average'][0]:.1f}")
    print(json.dumps({'benchmark': 'matmul_peak', 'size': _peak.SIZE, **peak,
                      'variants': {name: best[name] for name, *_ in VARIANTS}}))


if __name__ == '__main__':
    main()
