"""The training loop: data → jitted step → logs, checkpoints, end-of-epoch evaluation.

One procedural function in banner-marked sections, for every task (`tasks.py`: BAM
pretraining with its kNN and ContrastiveCrop boxes, or fine-tuning with its top-1/top-5):
the task gives the state, step, input and evaluation, the loop everything else. Everything a resumed run needs (train
state, input iterator position, boxes, config) is in the workdir's latest checkpoint, so
starting the same command again continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType

from bam_jax.train import metrics_log, resume, tasks
from bam_jax.train.builder import clamp_warmup
from bam_jax.train.checkpoint import Checkpointer, abstract_like
from bam_jax.train.step import shard_batch

class NonFiniteError(RuntimeError):
    """The loss or the gradients stopped being finite; the last good checkpoint stays."""


class _Preemption:
    """SIGTERM or SIGINT (Ctrl-C) → save and stop.

    Several processes agree on the step through JAX's preemption sync: its coordination
    service catches SIGTERM, so a SIGINT is passed on to this process as a SIGTERM. One
    process catches both itself. `signal` is the first one received (the exit status is
    128 + it).
    """

    def __init__(self):
        self.signal: int | None = None
        self._single = jax.process_count() == 1
        handled = (signal.SIGTERM, signal.SIGINT) if self._single else (signal.SIGINT,)
        self._previous = {number: signal.signal(number, self._catch) for number in handled}

    def _catch(self, signum, frame):
        if self.signal is None:
            logging.info('%s: saving a checkpoint after this step, then stopping.',
                         signal.Signals(signum).name)
            self.signal = signum
        if not self._single and signum == signal.SIGINT:
            signal.raise_signal(signal.SIGTERM)  # to the coordination service's handler

    def reached(self, step: int) -> bool:
        if self._single:
            return self.signal is not None
        if multihost_utils.reached_preemption_sync_point(step):
            self.signal = self.signal or signal.SIGTERM
            return True
        return False

    def restore(self):
        for number, previous in self._previous.items():
            signal.signal(number, previous)


def data_mesh() -> jax.sharding.Mesh:
    """All devices of all processes on one 'data' axis (pure data parallelism)."""
    return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Auto,))


def _check_finite(step: int, metrics: dict[str, Any]):
    values = {name: float(metrics[name]) for name in ('loss', 'grad_norm')}
    if not all(np.isfinite(value) for value in values.values()):
        raise NonFiniteError(
            f'step {step}: non-finite {values}; stopping. The last good checkpoint is '
            'kept: lower optimizer.lr or optimizer.clip_grad, or check the input data.')


def train_and_evaluate(config, workdir: str, *, from_step: int | None = None,
                       fresh: bool = False, force_config: bool = False) -> dict[str, Any]:
    """Trains the run in `workdir`: from scratch, or from its newest intact checkpoint
    (`from_step`: that one; later ones are moved aside), or afresh (`fresh`: the old
    run's files are moved aside). A config that defines another run than the saved one
    is refused unless `force_config`. A new run that stops before its first checkpoint
    leaves nothing behind.

    Returns the last step, the signal that stopped the run (None if it ran to its end),
    whether it had already finished, whether its splits are labelled (what the
    evaluation needs), and the last kNN results.
    """
    workdir = resume.workdir_path(workdir)
    resume.check_flags(workdir, from_step=from_step, fresh=fresh, force_config=force_config)
    existed, new_run = workdir.exists(), resume.holds_no_run(workdir)
    try:
        return _train(config, workdir, from_step=from_step, fresh=fresh,
                      force_config=force_config)
    except BaseException:
        if new_run:
            resume.remove_unsaved_run(workdir, created=not existed)
        raise


def _train(config, workdir, *, from_step, fresh, force_config) -> dict[str, Any]:
    main_process = jax.process_index() == 0

    # ------------------------------------------------------------------------------
    # Checks, data sources and durations (epochs → steps, once). Errors here come
    # before any compilation and leave the workdir as it was.
    # ------------------------------------------------------------------------------
    mesh = data_mesh()
    task = tasks.make_task(config, jax.device_count())
    clamp_warmup(config)
    train_source = task.train_source
    tasks.check_batch(train_source, config.batch_size, config)
    steps_per_epoch = len(train_source) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    logging.info('%d images, %d steps per epoch, %d steps.', len(train_source),
                 steps_per_epoch, total_steps)
    resume.prepare_workdir(workdir, fresh=fresh)

    # ------------------------------------------------------------------------------
    # The workdir's checkpoints: is this the same run, and has it finished?
    # ------------------------------------------------------------------------------
    checkpointer = Checkpointer(
        workdir / 'checkpoints', max_to_keep=config.max_checkpoints,
        save_interval_steps=config.checkpoint_every_steps, json_items=('data', 'config'),
        array_items=task.array_items)
    try:  # a refusal closes the checkpointer: its threads must not outlive the exit
        latest = checkpointer.latest_step() if from_step is None else from_step
        if latest is not None:
            saved_config = checkpointer.read_json(latest, 'config')
            if saved_config is not None:
                resume.check_same_run(saved_config, json.loads(config.to_json_best_effort()),
                                      workdir, latest, force=force_config)
        if from_step is not None:
            later = [step for step in checkpointer.all_steps() if step > from_step]
            if main_process:
                resume.move_aside(workdir, [checkpointer.directory / str(step) for step in later],
                                  f'resuming from step {from_step}')
            multihost_utils.sync_global_devices('later checkpoints moved aside')
            checkpointer.reload()

        # ------------------------------------------------------------------------------
        # The task's state and step; resume from the newest intact checkpoint.
        # ------------------------------------------------------------------------------
        state, train_step = task.build(mesh, steps_per_epoch, initialise=latest is None)
        data_state = None
        if latest is not None:
            state, items, step = checkpointer.restore_newest_intact(
                abstract_like(state), set_aside_to=workdir / 'corrupt')
            data_state = items['data']
            task.restore_items(items)
            if step >= total_steps:
                logging.info('The run in %s had finished at step %d: nothing to do.', workdir,
                             step)
                checkpointer.close()
                return {'step': step, 'signal': None, 'finished_before': True,
                        **task.result({})}
            logging.info('Resumed from step %d.', step)
    except BaseException:
        checkpointer.close()
        raise
    if main_process:
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    start_step = int(state.step)

    def make_iterator(epoch: int):
        """The task's input from the current position."""
        iterator = iter(task.make_input(epoch))
        if data_state is not None:
            iterator.set_state(data_state)
        return iterator

    # ------------------------------------------------------------------------------
    # Logging and checkpoint helpers.
    # ------------------------------------------------------------------------------
    writer = metrics_log.MetricsLog(workdir, main_process=main_process)
    if start_step == 0:
        writer.write_hparams(dict(_flatten(config.to_dict())))
    progress = metrics_log.Progress(total_steps, start_step)
    # A trace of `profile_steps` steps into the workdir (TensorBoard's profile tab), from
    # the 10th step on: after compilation and the input pipeline's warm-up.
    profile_first = start_step + 10 if main_process and config.get('profile_steps') else None
    tracing = False

    def save(step: int, *, force: bool = False):
        items = dict(data=iterator.get_state(), config=json.loads(
            config.to_json_best_effort()), **task.checkpoint_items())
        if checkpointer.save(step, state, force=force, **items):
            logging.info('Saving checkpoint at step %d.', step)

    # ------------------------------------------------------------------------------
    # End of an epoch: the task's evaluation (and input changes) on its schedule.
    # ------------------------------------------------------------------------------
    evaluation: dict[str, float] = {}
    evaluated_at = 0  # the step of `evaluation`: a stopped run's last is epochs behind

    def end_of_epoch(epoch: int):
        nonlocal data_state, iterator, evaluation, evaluated_at
        scalars, restart_input = task.end_of_epoch(epoch, state, progress)
        if scalars:
            evaluation, evaluated_at = scalars, step
            writer.write_scalars(step, scalars)
        if restart_input:  # the workers read what changed when the iterator is made
            data_state = iterator.get_state()
            iterator.close()
            iterator = make_iterator(epoch + 1)

    # ------------------------------------------------------------------------------
    # The loop.
    # ------------------------------------------------------------------------------
    preemption = _Preemption()
    iterator = make_iterator(start_step // steps_per_epoch)
    history: list[dict[str, jax.Array]] = []
    previous = None  # the last step's metrics, checked while the next step runs
    interval_start = time.time()
    step = start_step
    try:
        while step < total_steps:
            with jax.profiler.StepTraceAnnotation('train', step_num=step):
                batch = next(iterator)
                batch = shard_batch({key: batch[key] for key in task.step_inputs
                                     if key in batch}, mesh)
                state, metrics = train_step(state, batch)
            if previous is not None:
                _check_finite(step, previous)
            previous = metrics
            history.append(metrics)
            step += 1
            if step == profile_first:
                jax.profiler.start_trace(str(workdir))
                tracing = True
            elif tracing and step == profile_first + config.profile_steps:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                tracing = False
                logging.info('Profile of steps %d-%d written to %s (TensorBoard: Profile).',
                             profile_first + 1, step, workdir / 'plugins' / 'profile')

            if step % config.log_every_steps == 0 or step == total_steps:
                scalars = {name: float(np.mean([float(m[name]) for m in history]))
                           for name in history[-1]}
                elapsed = time.time() - interval_start
                scalars['images_per_sec'] = len(history) * config.batch_size / elapsed
                scalars['steps_per_sec'] = progress.report(step)
                scalars['bad_images'] = float(iterator.bad_count)
                writer.write_scalars(step, scalars)
                history, interval_start = [], time.time()

            epoch_done = step % steps_per_epoch == 0
            if epoch_done:  # before the save, so a resumed run has this epoch's boxes
                _check_finite(step, metrics)
                end_of_epoch(step // steps_per_epoch - 1)
            if preemption.reached(step):
                _check_finite(step, metrics)
                save(step, force=True)
                logging.warning('Stopped by %s: saved step %d; the same command resumes.',
                                signal.Signals(preemption.signal).name, step)
                break
            if step == total_steps or epoch_done or step % config.checkpoint_every_steps == 0:
                _check_finite(step, metrics)
                save(step, force=step == total_steps or epoch_done)
    finally:
        if tracing:
            jax.profiler.stop_trace()
        preemption.restore()
        checkpointer.wait_until_finished()
        if hasattr(iterator, 'close'):
            iterator.close()
    evaluation = task.finish(evaluated_at, evaluation, total_steps=total_steps,
                             workdir=workdir)
    writer.flush()
    writer.close()
    checkpointer.close()
    return {'step': step, 'signal': preemption.signal, 'finished_before': False,
            **task.result(evaluation)}


def _flatten(tree: dict, prefix: str = ''):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', value if isinstance(value, (int, float, str, bool)) \
                else str(value)
