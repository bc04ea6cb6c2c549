"""What a (re)started run does with its workdir: check it, start afresh, or resume.

A run is defined by its config: resuming it under a config that trains something else
(another batch size reinterprets the saved step, more epochs stretch every schedule,
another data set or model is another run) is refused, naming the key and the way out.
Keys that only steer the run (logging, checkpointing, workers, where the data lies, the
online kNN) may change. Nothing here deletes a file: what a run replaces is moved aside
into the workdir, with the time in its name.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from bam_jax.train.builder import ConfigError

# Config keys (and key prefixes, ending in '.') that may change when a run resumes.
RUN_CONTROL = ('log_every_steps', 'checkpoint_every_steps', 'max_checkpoints', 'shard_state',
               'profile_steps', 'data.num_workers', 'data.data_dir', 'data.max_bad_fraction',
               'knn.', 'evaluation.',
               # fine-tuning's end-of-epoch evaluation (top-1 / top-5) and its initial
               # backbone's location (a resumed run reads its checkpoint, not that)
               'eval.', 'init.workdir', 'init.file')

# Keys added to the configs after runs were saved without them, with the value that does
# what those runs did: a run saved before a key existed resumes under that value.
ADDED_KEYS = {'model.drop_path_rate': 0.0}

# What a run writes into its workdir (all of it moves aside with --fresh).
RUN_FILES = ('checkpoints', 'config.json', 'metrics.jsonl', 'events.out.tfevents.*',
             'plugins', 'knn_pixels.json')


def _flatten(tree: dict, prefix: str = '') -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
    return flat


def config_changes(saved: dict, current: dict) -> tuple[list, list]:
    """(changes of keys that define the run, changes of run-control keys), each a list
    of (key, saved value, current value)."""
    saved, current = _flatten(saved), _flatten(current)
    defining, control = [], []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key, '(absent)'), current.get(key, '(absent)')
        if old == '(absent)' and key in ADDED_KEYS and new == ADDED_KEYS[key]:
            continue  # saved before the key existed: it did what this value does
        if old != new:
            steering = any(key == name or (name.endswith('.') and key.startswith(name))
                           for name in RUN_CONTROL)
            (control if steering else defining).append((key, old, new))
    return defining, control


def _listed(changes) -> str:
    return '; '.join(f'config.{key}: {old!r} → {new!r}' for key, old, new in changes)


def check_same_run(saved: dict, current: dict, workdir, step: int, *, force: bool):
    """Refuses (ConfigError) a resume whose config defines another run, unless `force`."""
    defining, control = config_changes(saved, current)
    if control:
        logging.info('Resuming with changed run-control keys: %s.', _listed(control))
    if not defining:
        return
    if force:
        logging.warning('--force_config: resuming step %d with changed keys: %s.', step,
                        _listed(defining))
        return
    key, old, new = defining[0]
    more = (f' (also {", ".join(f"config.{other}" for other, _, _ in defining[1:])})'
            if len(defining) > 1 else '')
    raise ConfigError(
        f'{workdir} holds a run made with config.{key}={old!r}, not {new!r}{more}: resuming '
        f'its step {step} would reinterpret it. Use the run\'s value, another --workdir, '
        '--fresh to start afresh here (the old run is kept), or --force_config to resume '
        'anyway.')


def check_flags(workdir: epath.Path, *, from_step: int | None, fresh: bool,
                force_config: bool) -> None:
    """Refuses (ConfigError) flag combinations that cannot both be meant, and a
    `--from_step` the workdir does not have, before anything is moved or created."""
    if fresh and from_step is not None:
        raise ConfigError(f'--fresh starts afresh and --from_step={from_step} resumes: pass '
                          'one of them.')
    if fresh and force_config:
        raise ConfigError('--force_config resumes a run under changed keys and --fresh '
                          'resumes nothing: pass one of them.')
    if from_step is not None:
        steps = saved_steps(workdir)
        if from_step not in steps:
            raise ConfigError(f'--from_step={from_step}: no such checkpoint in '
                              f'{workdir / "checkpoints"}; available steps: '
                              f'{", ".join(map(str, steps)) or "none"}.')


def saved_steps(workdir: epath.Path) -> list[int]:
    """The committed checkpoint steps (orbax renames a step's directory to its number
    when the save is complete), read without starting a checkpoint manager."""
    directory = workdir / 'checkpoints'
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def holds_no_run(workdir: epath.Path) -> bool:
    """Whether nothing of a run is in `workdir` yet (it may not exist)."""
    return not workdir.exists() or not any(
        any(workdir.glob(pattern)) for pattern in RUN_FILES)


def remove_unsaved_run(workdir: epath.Path, *, created: bool) -> None:
    """After a new run stopped before its first checkpoint (bad input found while
    reading, Ctrl-C while compiling), removes what it wrote, so that the workdir is as
    it was; a run with a saved step is left alone. Process 0 only."""
    if jax.process_index() or saved_steps(workdir):
        return
    for pattern in RUN_FILES:
        for path in workdir.glob(pattern):
            if path.is_dir():
                path.rmtree()
            else:
                path.unlink()
    if created and workdir.is_dir() and not any(workdir.iterdir()):
        workdir.rmdir()


def workdir_path(workdir: str) -> epath.Path:
    """The workdir as a path that also reaches `gs://` (orbax needs local paths absolute)."""
    path = epath.Path(workdir)
    return path if '://' in str(workdir) else epath.Path(path.absolute())


def prepare_workdir(workdir: epath.Path, *, fresh: bool) -> None:
    """Creates `workdir` (one line if it is a file or not writable); with `fresh`, moves
    an earlier run's files to `workdir/replaced/<time>/`. Process 0 writes; all wait."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f'--workdir {workdir} is a file; give a directory.')
    failure = ''
    if jax.process_index() == 0:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            probe = workdir / f'.write_test.{time.time_ns()}'
            probe.write_text('')
            probe.unlink()
        except OSError as error:
            failure = f'--workdir {workdir} cannot be written: {error.strerror or error}.'
        if fresh and not failure:
            move_aside(workdir, [path for pattern in RUN_FILES
                                 for path in sorted(workdir.glob(pattern))], 'starting afresh')
    if multihost_utils.broadcast_one_to_all(np.int32(bool(failure))):
        raise ConfigError(failure or f'--workdir {workdir} cannot be written (see process 0).')


def move_aside(workdir: epath.Path, paths: list[epath.Path], why: str) -> None:
    """Moves `paths` (inside `workdir`) to `workdir/replaced/<time>/`, keeping their
    relative paths; one INFO line. Call on process 0 only."""
    if not paths:
        return
    destination = workdir / 'replaced' / time.strftime('%Y%m%dT%H%M%S')
    for path in paths:
        target = destination / path.relative_to(workdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    logging.info('%s: moved %s to %s.', why.capitalize(),
                 ', '.join(str(path.relative_to(workdir)) for path in paths), destination)
