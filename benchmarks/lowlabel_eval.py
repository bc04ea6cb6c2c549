r"""The low-label protocols on random features: compile and run time of each.

  python benchmarks/lowlabel_eval.py [--sizes 1000 10000] [--dim 128] [--repeats 3]

N × D Gaussian features with 10 balanced classes: `few_shot` (5-way 5-shot, 15
queries, 600 episodes; prototype and logistic), `recall_at_k` (K = 1, 2, 4, 8) and
`kmeans_scores` (10 clusters, 10 inits). The first call (compilation and run) is timed
once; runs are the best of `repeats`, timed in turns with this machine's 4096³ fp32
matmul (`benchmarks/_peak.py`), and reported also as multiples of that product's time,
the ratio that stays meaningful on a shared machine. Prints a table and one JSON line.
"""

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import _peak  # noqa: E402
from bam_jax.evaluate import clustering, fewshot, retrieval  # noqa: E402

N_CLASSES = 10


def workloads(features, labels):
    return {
        'few_shot prototype': functools.partial(fewshot.few_shot, features, labels),
        'few_shot logistic': functools.partial(fewshot.few_shot, features, labels,
                                               classifier='logistic'),
        'recall_at_k': functools.partial(retrieval.recall_at_k, features, labels),
        'kmeans_scores': functools.partial(clustering.kmeans_scores, features, labels),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 10000])
    parser.add_argument('--dim', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    runners, first_call = {}, {}
    for size in args.sizes:
        features = rng.normal(size=(size, args.dim)).astype(np.float32)
        labels = np.arange(size) % N_CLASSES
        for name, run in workloads(features, labels).items():
            start = time.perf_counter()
            run()
            first_call[name, size] = time.perf_counter() - start
            runners[f'{name} N={size}'] = run
    peak = _peak.measure_peak(repeats=args.repeats, also=runners)
    matmul_seconds = _peak.matmul_flops() / (peak['peak_gflops'] * 1e9)
    rows = [dict(function=name, n=size, dim=args.dim, first_call_seconds=first,
                 run_seconds=peak['seconds'][f'{name} N={size}'],
                 run_in_matmuls=peak['seconds'][f'{name} N={size}'] / matmul_seconds)
            for (name, size), first in first_call.items()]
    del peak['seconds']

    print(f"Low-label protocols on N x {args.dim} random features, {N_CLASSES} classes, "
          f"best of {args.repeats}; one 4096^3 fp32 matmul = {matmul_seconds * 1e3:.0f} ms "
          f"({peak['peak_source']}); load average {peak['load_average'][0]:.1f}")
    print(f"{'function':<20} {'N':>6} {'first call s':>13} {'run s':>8} "
          f"{'run / matmul':>13}")
    for row in rows:
        print(f"{row['function']:<20} {row['n']:>6} {row['first_call_seconds']:13.2f} "
              f"{row['run_seconds']:8.3f} {row['run_in_matmuls']:13.2f}")
    print(json.dumps({'benchmark': 'lowlabel_eval', 'peak': peak, 'rows': rows}))


if __name__ == '__main__':
    main()
