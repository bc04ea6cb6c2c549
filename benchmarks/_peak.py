"""This machine's fp32 matmul peak, measured in the caller's own process (and its memory peak).

Every benchmark reports its throughput as a fraction of this peak, measured in the same
run: on a shared machine only ratios taken close together in time mean anything.
The peak is the faster of NumPy's and JAX's 4096³ fp32 matmul, timed in turns with
the workload being measured (one NumPy product, one JAX product, one workload call,
and again), best of `repeats` each.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import numpy as np

SIZE = 4096
OPENBLAS_SPIN_SECONDS = 0.2


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` calls: the run least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops(size: int = SIZE) -> float:
    return 2.0 * size ** 3


def matmul_runners(size: int = SIZE) -> dict[str, Callable[[], object]]:
    """One fp32 `size`³ product per call, for NumPy and for jitted JAX (compiled here)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    product = jax.jit(jnp.matmul)
    a_device, b_device = jax.device_put(a), jax.device_put(b)
    product(a_device, b_device).block_until_ready()
    return {'numpy': lambda: a @ b,
            'jax': lambda: product(a_device, b_device).block_until_ready()}


def measure_peak(repeats: int = 5, size: int = SIZE,
                 also: dict[str, Callable[[], object]] | None = None) -> dict:
    """GFLOP/s of NumPy and JAX and the peak (the faster), timed in turns.

    Each round times one NumPy product, one JAX product and one call of every function
    in `also` (the workloads being measured), so all of them see the same background
    load; the best of `repeats` rounds is kept. Their best times are returned under
    `seconds`.
    """
    runners = matmul_runners(size)
    workloads = {**runners, **(also or {})}
    load_before = os.getloadavg()[0]
    best = {name: float('inf') for name in workloads}
    for _ in range(repeats):
        for name, run in workloads.items():
            best[name] = min(best[name], best_seconds(run, 1))
            if name == 'numpy':
                # OpenBLAS's threads spin for a while after a product; the next JAX
                # call would share the cores with them (measured: 10-15 % slower).
                time.sleep(OPENBLAS_SPIN_SECONDS)
    gflops = {f'{name}_gflops': matmul_flops(size) / best[name] / 1e9 for name in runners}
    source = max(runners, key=lambda name: gflops[f'{name}_gflops'])
    # Other processes on the machine: the 1-minute load average around the measurement.
    return {**gflops, 'peak_gflops': gflops[f'{source}_gflops'], 'peak_source': source,
            'load_average': [load_before, os.getloadavg()[0]],
            'seconds': {name: best[name] for name in also or {}}}


def process_peak_rss_gib() -> float:
    """The calling process's peak resident memory so far (Linux `VmHWM`), GiB."""
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 2 ** 20
    return float('nan')


def cpu_model() -> str:
    """The CPU's model name: a timing holds only on the machine that made it."""
    try:
        with open('/proc/cpuinfo') as file:
            for line in file:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
