"""Orbax checkpoints of a run: the train state plus side items (data iterator, config, boxes).

Saves are asynchronous and atomic (orbax writes into a temporary directory and renames it
when complete), so a crash or kill mid-save leaves the previous checkpoint intact and
the partial one is ignored. Restoring takes an abstract state whose shardings are those
of the *current* mesh, so a checkpoint written on 8 devices restores onto 1.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

STATE = 'state'


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or of another run; the message says which."""


class Checkpointer:
    """A workdir's checkpoints: `save` every `save_interval_steps`, keep `max_to_keep`.

    `json_items` names the side items saved as JSON with every state (for example
    'data' for the input iterator's state and 'config' for the resolved config);
    `array_items` names host NumPy side items (for example the ContrastiveCrop boxes),
    identical on every process.
    """

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3,
                 save_interval_steps: int = 1, json_items: tuple[str, ...] = (),
                 array_items: tuple[str, ...] = (), async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
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
        except (ValueError, KeyError, FileNotFoundError, TypeError) as error:
            raise CheckpointError(
                f'cannot restore step {step} from {self.directory}: {error}') from error
        items = {name: restored[name] for name in self.json_items}
        items.update({name: np.asarray(restored[name][name]) for name in self.array_items})
        return restored[STATE], items

    def wait_until_finished(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def abstract_like(state, mesh: jax.sharding.Mesh):
    """Shapes and dtypes of `state` (real or abstract), replicated on `mesh`."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
