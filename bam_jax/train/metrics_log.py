"""The run's metrics: console, TensorBoard, a JSON-lines file, and progress with an ETA.

`metrics.jsonl` holds every logged scalar at full float precision, one line per step,
so runs can be compared exactly (resume tests) and plotted without TensorBoard. The
hyperparameters go to TensorBoard (and the workdir's config.json), not to the console,
where they would be one line of a few thousand characters.

The TensorBoard event files are the ones `tf.summary` writes (scalars, and the hparams
plugin's session record), built from the `tensorboard` package's protos and record format
without TensorFlow. Importing TensorFlow costs every start of `train.py` about 7 s of CPU,
and the trainer needs nothing else from it; clu's `metric_writers` package imports it on
import, so its writers are not used. File writes run on one background thread (clu's
`asynclib.Pool`), so a slow `gs://` workdir does not hold up the steps.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import time
from typing import Any, Mapping

from clu import asynclib
from etils import epath
from google.protobuf import struct_pb2
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


class _EventFile:
    """A TensorBoard event file in `logdir`, created at the first write (a run that
    stops before logging anything leaves no empty file)."""

    def __init__(self, logdir: epath.Path):
        self._path = logdir / (f'events.out.tfevents.{time.time():.0f}.'
                               f'{socket.gethostname()}.{os.getpid()}.v2')
        self._records: RecordWriter | None = None

    def write(self, step: int, summary: summary_pb2.Summary):
        if self._records is None:
            self._records = RecordWriter(self._path.open('wb'))
            self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: event_pb2.Event):
        self._records.write(event.SerializeToString())

    def flush(self):
        if self._records is not None:
            self._records.flush()

    def close(self):
        if self._records is not None:
            self._records.close()


def _hparams_summary(hparams: Mapping[str, Any]) -> summary_pb2.Summary:
    """The hparams plugin's session-start record: the run's row in TensorBoard's HPARAMS tab."""
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].CopyFrom(struct_pb2.Value(bool_value=value))
        elif isinstance(value, (int, float)):
            start.hparams[name].CopyFrom(struct_pb2.Value(number_value=value))
        else:
            start.hparams[name].CopyFrom(struct_pb2.Value(string_value=str(value)))
    summary_metadata = hparams_metadata.create_summary_metadata(
        plugin_data_pb2.HParamsPluginData(session_start_info=start))
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=hparams_metadata.SESSION_START_INFO_TAG, metadata=summary_metadata,
        tensor=hparams_metadata.NULL_TENSOR)])


class MetricsLog:
    """Scalars to the console on every process; to TensorBoard and `metrics.jsonl` on
    the main one. `flush` waits for the background writes and re-raises their errors."""

    def __init__(self, workdir: str | os.PathLike, *, main_process: bool):
        self._main = main_process
        self._pool = asynclib.Pool(thread_name_prefix='metrics_log', max_workers=1)  # in order
        if main_process:
            workdir = epath.Path(workdir)  # gs:// too
            self._events = _EventFile(workdir)
            self._jsonl_path = workdir / 'metrics.jsonl'
            self._jsonl = None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        scalars = {name: float(value) for name, value in scalars.items()}
        logging.info('[%d] %s', step, ', '.join(
            f'{name}={value:.6g}' for name, value in sorted(scalars.items())))
        if self._main:
            self._pool(self._write_scalars)(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]):
        if self._main:
            self._pool(self._events.write)(0, _hparams_summary(hparams))

    def _write_scalars(self, step: int, scalars: dict[str, float]):
        if self._jsonl is None:
            written = self._jsonl_path.read_bytes() if self._jsonl_path.exists() else b''
            self._jsonl = self._jsonl_path.open('a')
            if written and not written.endswith(b'\n'):  # a kill mid-line: a fresh line
                self._jsonl.write('\n')
        self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
        self._jsonl.flush()
        self._events.write(step, summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=name, simple_value=value)
            for name, value in scalars.items()]))
        self._events.flush()  # a TensorBoard open on the run sees every log as it comes

    def flush(self):
        self._pool.join()
        if self._main:
            self._events.flush()

    def close(self):
        self.flush()
        self._pool.close()
        if self._main:
            self._events.close()
            if self._jsonl is not None:
                self._jsonl.close()


def read_metrics(workdir: str | os.PathLike) -> dict[int, dict[str, float]]:
    """`metrics.jsonl` as {step: scalars}; a step logged twice (after a resume) keeps
    its last values, and a line cut short by a kill is ignored."""
    metrics: dict[int, dict[str, float]] = {}
    path = epath.Path(workdir) / 'metrics.jsonl'
    for line in path.read_text().splitlines():
        try:
            scalars = json.loads(line)
        except json.JSONDecodeError:
            continue
        metrics.setdefault(scalars.pop('step'), {}).update(scalars)
    return metrics


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f'{seconds} s'
    if seconds < 3600:
        return f'{seconds // 60} min {seconds % 60:02d} s'
    return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'


class Progress:
    """Steps/s and the ETA at each log, and the share of the time spent in named parts
    of the loop (kNN, ContrastiveCrop boxes) so a slow evaluation shows."""

    def __init__(self, total_steps: int, start_step: int):
        self._total = total_steps
        self._start = self._last_time = time.monotonic()
        self._last_step = start_step
        self._parts: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def timed(self, name: str):
        """Times a part whose results are fetched inside the block (wall time)."""
        start = time.monotonic()
        yield
        self._parts[name] += time.monotonic() - start

    def report(self, step: int) -> float:
        """Logs one progress line; returns steps/s since the previous report."""
        now = time.monotonic()
        steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self._total - step) / steps_per_sec if steps_per_sec else float('inf')
        parts = ', '.join(f'{name} {100 * seconds / (now - self._start):.0f}%'
                          for name, seconds in sorted(self._parts.items()))
        logging.info('Step %d/%d (%.0f%%): %.2f steps/s, ETA %s%s', step, self._total,
                     100 * step / self._total, steps_per_sec,
                     duration(eta) if eta != float('inf') else '?',
                     f' (time in {parts})' if parts else '')
        return steps_per_sec
