"""The run's metric writers: TensorBoard and console (clu), plus a JSON-lines file.

`metrics.jsonl` holds every logged scalar at full float precision, one line per step,
so runs can be compared exactly (resume tests) and plotted without TensorBoard. The
hyperparameters go to TensorBoard (and the workdir's config.json), not to the console,
where they would be one line of a few thousand characters.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from clu import metric_writers
from etils import epath
from clu.metric_writers import interface, logging_writer


class JsonLinesWriter(interface.MetricWriter):
    """Appends `{"step": s, name: value, ...}` lines; ignores non-scalar summaries."""

    def __init__(self, path: str | os.PathLike):
        path = epath.Path(path)  # gs:// too
        written = path.read_bytes() if path.exists() else b''
        self._file = path.open('a')
        if written and not written.endswith(b'\n'):  # a kill mid-line: a fresh line
            self._file.write('\n')

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        line = {'step': int(step), **{name: float(value) for name, value in scalars.items()}}
        self._file.write(json.dumps(line) + '\n')
        self._file.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class ConsoleWriter(logging_writer.LoggingWriter):
    """clu's console writer without the hyperparameters."""

    def write_hparams(self, hparams):
        pass


def create_writer(workdir: str | os.PathLike, *, main_process: bool):
    """TensorBoard + console + JSON lines on the main process; console elsewhere.

    As `metric_writers.create_default_writer` (asynchronous), with `ConsoleWriter`.
    """
    if not main_process:
        return metric_writers.AsyncMultiWriter([ConsoleWriter()])
    workdir = epath.Path(workdir)
    return metric_writers.MultiWriter([
        metric_writers.AsyncMultiWriter([ConsoleWriter(),
                                         metric_writers.SummaryWriter(str(workdir))]),
        JsonLinesWriter(workdir / 'metrics.jsonl')])


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
