"""Where a compiled XLA program spends its time: a profiler trace summed per HLO op.

`jax.profiler` records one event per executed HLO instruction (fusion, dot, YNNPACK
call). Each is mapped back to its instruction in the compiled text, whose `op_name`
metadata says which part of the model or step it came from, and summed per category.
The XLA:CPU runtime may run independent ops at the same time on its threads, so the
summed op time can exceed the wall time; the shares are of the summed op time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
from typing import Callable

import jax

_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def instructions(compiled_text: str) -> dict[str, tuple[str, str, bool]]:
    """HLO instruction name -> (opcode, op_name, is a matmul or convolution)."""
    table = {}
    for line in compiled_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        op_name = _OP_NAME.search(line)
        op_name = op_name.group(1) if op_name else ''
        opcode = match.group(2)
        is_matmul = (opcode in ('dot', 'convolution')
                     or (opcode == 'fusion' and re.search(r'/(dot_general|conv_general_dilated)$',
                                                        op_name) is not None))
        table[match.group(1)] = (opcode, op_name, is_matmul)
    return table


def op_seconds(run: Callable[[], object], n_runs: int = 1) -> dict[str, float]:
    """Seconds per traced event name, summed over threads, averaged over `n_runs`."""
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(n_runs):
                jax.block_until_ready(run())
        path = glob.glob(f'{log_dir}/**/*.trace.json.gz', recursive=True)[0]
        with gzip.open(path) as trace_file:
            events = json.load(trace_file)['traceEvents']
    totals = collections.defaultdict(float)
    for event in events:
        if event.get('ph') == 'X':
            totals[event['name']] += event['dur'] * 1e-6 / n_runs
    return totals


def summarize(compiled, run: Callable[[], object], categorize: Callable[[str, bool], str],
              n_runs: int = 1) -> list[tuple[str, float]]:
    """(category, seconds) per category, largest first, from one traced run."""
    table = instructions(compiled.as_text())
    per_category = collections.defaultdict(float)
    for name, seconds in op_seconds(run, n_runs).items():
        if name in table:
            _, op_name, is_matmul = table[name]
            per_category[categorize(op_name, is_matmul)] += seconds
    return sorted(per_category.items(), key=lambda item: -item[1])
