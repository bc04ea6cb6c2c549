"""Orbax checkpoints of a run: the train state plus side items (data iterator, config, boxes).

Saves are asynchronous and atomic (orbax writes into a temporary directory and renames it
when complete), so a crash or kill mid-save leaves the previous checkpoint intact and
the partial one is ignored. Restoring takes an abstract state whose shardings are those
of the *current* run (`abstract_like`), so a checkpoint written on 8 devices restores
onto 1, and one written by a replicated state restores sharded, and back.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

STATE = 'state'


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or of another run; the message says which.
    `corrupt`: its files are damaged (as opposed to missing, or of another model)."""

    def __init__(self, message: str, *, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt


class Checkpointer:
    """A workdir's checkpoints: `save` every `save_interval_steps`, keep `max_to_keep`.

    `json_items` names the side items saved as JSON with every state (for example
    'data' for the input iterator's state and 'config' for the resolved config);
    `array_items` names host NumPy side items (for example the ContrastiveCrop boxes),
    identical on every process.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
                 save_interval_steps: int = 1, json_items: tuple[str, ...] = (),
                 array_items: tuple[str, ...] = (), async_save: bool = True):
        self.directory = epath.Path(directory)
        if '://' not in str(directory):  # orbax refuses relative local paths
            self.directory = epath.Path(self.directory.absolute())
        self.json_items = tuple(json_items)
        self.array_items = tuple(array_items)
        handlers = {STATE: ocp.StandardCheckpointHandler(),
                    **{name: ocp.JsonCheckpointHandler() for name in self.json_items},
                    **{name: ocp.StandardCheckpointHandler() for name in self.array_items}}
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=tuple(handlers), item_handlers=handlers,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def reload(self):
        """Re-reads the step list after steps were moved away."""
        self._manager.reload()

    def save(self, step: int, state, *, force: bool = False, **items) -> bool:
        """Starts saving `state` (and the side items) at `step`; False if not due."""
        missing = set(self.json_items + self.array_items) - set(items)
        if missing:
            raise ValueError(f'save() needs the items {sorted(missing)}')
        args = {STATE: ocp.args.StandardSave(state),
                **{name: ocp.args.JsonSave(items[name]) for name in self.json_items},
                **{name: ocp.args.StandardSave({name: items[name]})
                   for name in self.array_items}}
        return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """The state at `step` (default: latest) laid out like `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (see
        `abstract_like`). Returns the state and a dict of the side items.
        """
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f'no checkpoint in {self.directory}')
        elif step not in steps:
            raise CheckpointError(f'no checkpoint for step {step} in {self.directory}; '
                                  f'available steps: {steps}')
        args = {STATE: ocp.args.StandardRestore(abstract_state),
                **{name: ocp.args.JsonRestore() for name in self.json_items},
                **{name: ocp.args.StandardRestore() for name in self.array_items}}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except ValueError as error:  # orbax: the saved tree is not this state's
            if 'do not match' not in str(error):
                raise CheckpointError(f'checkpoint {self.directory / str(step)} is corrupt '
                                      f'or unreadable: {root_cause(error)}',
                                      corrupt=True) from error
            raise CheckpointError(f'checkpoint {self.directory / str(step)} holds another '
                                  f'model or optimizer: {root_cause(error)}') from error
        except Exception as error:  # tensorstore reports unreadable data as a bare Exception
            raise CheckpointError(f'checkpoint {self.directory / str(step)} is corrupt or '
                                  f'unreadable: {root_cause(error)}', corrupt=True) from error
        items = {name: restored[name] for name in self.json_items}
        items.update({name: np.asarray(restored[name][name]) for name in self.array_items})
        return restored[STATE], items

    def restore_newest_intact(self, abstract_state, set_aside_to: epath.Path
                              ) -> tuple[Any, dict, int]:
        """(state, side items, step) of the newest step that restores.

        A step that does not (a truncated or missing file, a save cut short on a file
        system without atomic renames) is reported in one warning and moved, not
        deleted, to `set_aside_to/<step>`, so that later saves never collide with it.
        Raises `CheckpointError`, moving nothing, when no step restores.
        """
        unreadable = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, items = self.restore(abstract_state, step)
            except CheckpointError as error:
                if not error.corrupt:
                    raise
                unreadable.append((step, error))
                quiet_failed_restore()
                continue
            for bad_step, error in unreadable:
                logging.warning('%s; moved to %s, resuming from step %d.', error,
                                set_aside_to / str(bad_step), step)
                self._set_aside(bad_step, set_aside_to)
            if unreadable:
                self.reload()
            return state, items, step
        steps = ', '.join(str(step) for step, _ in unreadable)
        raise CheckpointError(f'no checkpoint in {self.directory} restores (steps {steps}; '
                              f'newest: {unreadable[0][1]}). Start afresh with --fresh '
                              '(the old files are kept), or pass --workdir elsewhere.')

    def _set_aside(self, step: int, destination: epath.Path):
        """Process 0 moves step's directory to `destination/<step>` once every process
        has tried to read it."""
        multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
        if jax.process_index() == 0:
            target = destination / str(step)
            if target.exists():  # set aside before, by an earlier run
                target = destination / f'{step}.{time.strftime("%Y%m%dT%H%M%S")}'
            destination.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        multihost_utils.sync_global_devices(f'set aside checkpoint {step}: done')

    def read_json(self, step: int, name: str):
        """One JSON side item of `step` (e.g. its config), without reading the arrays."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
        except Exception:  # unreadable: the caller decides from the state restore
            return None
        return restored[name]

    def wait_until_finished(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def quiet_failed_restore():
    """After a corrupt step's restore failed, tensorstore's reader threads still finish
    and call into orbax's event loop, closed by then, and orbax's abandoned read
    coroutines are collected with their errors: each reached `sys.unraisablehook` as a
    traceback, dozens of them after the run's one warning. Those alone are dropped (an
    error raised in orbax's code, or the closed loop); every other one still prints."""
    previous = sys.unraisablehook
    if getattr(previous, 'quiets_closed_event_loop', False):
        return

    def raised_in_orbax(traceback) -> bool:
        while traceback is not None and traceback.tb_next is not None:
            traceback = traceback.tb_next
        return traceback is not None and '/orbax/' in traceback.tb_frame.f_code.co_filename

    def hook(unraisable):
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'
        if not (closed_loop or raised_in_orbax(unraisable.exc_traceback)):
            previous(unraisable)
    hook.quiets_closed_event_loop = True
    sys.unraisablehook = hook
    # The same reads, gathered by asyncio, are logged as never retrieved.
    logging.getLogger('asyncio').addFilter(
        lambda record: 'Encountered error while reading array' not in record.getMessage())


def root_cause(error: BaseException) -> str:
    """The first line of the innermost cause: tensorstore's own words, not orbax's."""
    while error.__cause__ is not None:
        error = error.__cause__
    return (str(error).splitlines() or [type(error).__name__])[0][:300]


def abstract_like(state, mesh: jax.sharding.Mesh | None = None):
    """Shapes and dtypes of `state` (real or abstract) laid out as `state` is, or
    replicated on `mesh` if one is given: a restore target.

    Orbax reads every array into the target's sharding, so a checkpoint restores onto
    the run's own layout whatever layout (replicated or sharded) and device count wrote
    it.
    """
    def like(x):
        sharding = x.sharding if mesh is None else NamedSharding(mesh, P())
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(like, state)
