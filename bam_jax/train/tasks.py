"""What the training loop trains: the seam between the engine and a task.

The loop (`bam_jax.train.loop`) owns checkpoints, resume rules, signals, progress,
metrics and the multi-host set-up; a task owns what differs between pretraining and
fine-tuning: its train source, its state and jitted step, its input, its checkpointed
arrays beyond the state, and what it evaluates at the end of an epoch. `config.task`
chooses it ('pretrain' when absent: every run config written before the key), as
big_vision's one `train.py` runs pretraining and transfer from different configs.

A task has:
  train_source         the training split's source (its length sets the epoch)
  step_inputs          the host-batch keys the jitted step reads
  array_items          names of extra arrays checkpointed beside the state
  build(mesh, steps_per_epoch, *, initialise) -> (state, train_step)
                       `initialise`: a new run (load pretrained weights, say); a resumed
                       run's state then comes from its checkpoint
  restore_items(items) the extra arrays of a restored checkpoint
  checkpoint_items()   {name: array} to save with the state
  make_input(epoch)    a grain dataset of host batches from epoch `epoch` on
  end_of_epoch(epoch, state, progress) -> (scalars, restart_input)
                       what to log (and return at the end); whether the input must be
                       made again (it reads something that changed)
  result(evaluation)   entries of the loop's return value (for train.py's summary)
  finish(evaluated_at, evaluation, *, total_steps, workdir) -> evaluation
                       after the last step: the last evaluation's log line (made at
                       step `evaluated_at`), baselines beside it
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from bam_jax.data import ccrop, pipeline, sources
from bam_jax.train import online
from bam_jax.train.builder import ConfigError, build_training, validate_config

TASKS = ('pretrain', 'finetune')


def task_name(config) -> str:
    name = config.get('task', 'pretrain')
    if name not in TASKS:
        raise ConfigError(f'config.task={name!r}: expected one of {list(TASKS)}.')
    return name


def make_task(config, device_count: int):
    """The task `config.task` names, its config checked and its train source open."""
    if task_name(config) == 'finetune':
        from bam_jax.train.finetune import FinetuneTask  # pylint: disable=import-outside-toplevel
        return FinetuneTask(config, device_count)
    return PretrainTask(config, device_count)


def abstract_training(config, mesh: jax.sharding.Mesh, steps_per_epoch: int = 1):
    """What `config.task` builds (its `.state` shapes and shardings on `mesh` only, its
    jitted `.train_step`), allocating nothing: for compiling the step ahead of time
    (`benchmarks/memory_plan.py`)."""
    if task_name(config) == 'finetune':
        from bam_jax.train.finetune import build_finetuning  # pylint: disable=import-outside-toplevel
        return build_finetuning(config, mesh, steps_per_epoch, abstract=True)
    return build_training(config, mesh, steps_per_epoch, abstract=True)


def abstract_state(config, mesh: jax.sharding.Mesh):
    """The shapes (and shardings on `mesh`) of a run's train state, for restoring a
    checkpoint outside the loop (export, evaluation)."""
    return abstract_training(config, mesh).state


class PretrainTask:
    """BAM pretraining: multi-crop input (ContrastiveCrop boxes on their schedule), the
    BAM step with its EMA teacher, and the online kNN."""

    step_inputs = ('global', 'local', 'seed')

    def __init__(self, config, device_count: int):
        validate_config(config, device_count)
        self.config = config
        self.train_source = sources.make_source(config.data)
        self.use_ccrop = bool(config.data.get('ccrop'))
        self.array_items = ('boxes',) if self.use_ccrop else ()
        self.boxes = ccrop.initial_boxes(len(self.train_source)) if self.use_ccrop else None
        self._mesh = self._backbone = self._knn = None

    def build(self, mesh, steps_per_epoch: int, *, initialise: bool):
        del initialise  # the network starts from its seed's initialisation
        training = build_training(self.config, mesh, steps_per_epoch)
        self._mesh, self._backbone = mesh, training.network.backbone
        self._knn = online.make_online_knn(self.config, self._backbone, self.train_source,
                                           mesh)
        return training.state, training.train_step

    def restore_items(self, items: dict[str, Any]):
        self.boxes = items.get('boxes', self.boxes)

    def checkpoint_items(self) -> dict[str, Any]:
        return {'boxes': self.boxes} if self.use_ccrop else {}

    def make_input(self, epoch: int):
        """The input from `epoch` on; the boxes apply from their epoch on."""
        data = self.config.data
        boxes_now = self.boxes if self.use_ccrop and ccrop.use_boxes_in(
            epoch, data.ccrop_warmup_epochs, data.ccrop_loc_interval) else None
        return pipeline.make_train_pipeline(
            self.config, self.train_source, process_index=jax.process_index(),
            process_count=jax.process_count(), boxes=boxes_now)

    def end_of_epoch(self, epoch: int, state, progress) -> tuple[dict[str, float], bool]:
        """kNN and ContrastiveCrop boxes on their schedules."""
        config = self.config
        evaluation = {}
        if self._knn is not None and ((epoch + 1) % config.knn.every_epochs == 0
                                      or epoch + 1 == config.epochs):
            with progress.timed('knn'):
                evaluation = self._knn(state)
        restart_input = False
        if self.use_ccrop:
            warmup, interval = config.data.ccrop_warmup_epochs, config.data.ccrop_loc_interval
            if ccrop.update_boxes_after(epoch, config.epochs, warmup, interval):
                with progress.timed('contrastive_crop_boxes'):
                    self.boxes = online.contrastive_crop_boxes(
                        config, self._backbone, state, self.train_source, self._mesh)
                restart_input = ccrop.use_boxes_in(epoch + 1, warmup, interval)
            restart_input |= (ccrop.use_boxes_in(epoch + 1, warmup, interval)
                              != ccrop.use_boxes_in(epoch, warmup, interval))
        return evaluation, restart_input

    def result(self, evaluation: dict[str, float]) -> dict[str, Any]:
        return {'task': 'pretrain',
                'labelled': online.has_labelled_splits(self.config, self.train_source),
                **evaluation}

    def finish(self, evaluated_at: int, evaluation: dict[str, float], *, total_steps: int,
               workdir) -> dict[str, float]:
        """The last kNN in the log; at the run's end, the raw-pixel kNN of the same
        split beside it (the baseline, computed once: `online.pixel_knn`)."""
        if evaluation:
            logging.info('kNN (k=%d) at step %d: %s', self.config.knn.k, evaluated_at,
                         ', '.join(f'{name} {value:.2f}%'
                                   for name, value in sorted(evaluation.items())))
            if evaluated_at == total_steps:  # the baseline beside the final numbers
                evaluation.update({f'knn_pixels/{name}': value for name, value in
                                   online.pixel_knn(self._knn, self.config,
                                                    workdir).items()})
        return evaluation


def check_batch(source, batch_size: int, config):
    """A train split that cannot fill one global batch, refused before any compilation."""
    if len(source) < batch_size:
        raise sources.DataError(f'{config.data.source} split {config.data.split!r} has '
                                f'{len(source)} images, fewer than one global batch '
                                f'of {batch_size}.')

