"""Flax variables ↔ PyTorch state dicts: the one place for timm's names and layouts.

The Flax backbones carry timm's module names, so a conversion is a renaming plus the
layout change of each leaf kind. A path maps to a torch key by joining its module
names with dots, a numbered module `layer1_0` becoming `layer1.0` (flax names list
entries `name_i`, torch `name.i`). Dense `kernel` [in, out] is torch `weight`
[out, in]; Conv `kernel` [kh, kw, in/groups, out] is `weight` [out, in/groups, kh, kw]
(Conv1d likewise); norm `scale` and `embedding` are `weight`; BatchNorm `mean`/`var`
are `running_mean`/`running_var`, and torch's strict loading also needs the step
counter `num_batches_tracked` beside them, which flax does not keep. Loading goes the
other way and checks every key and shape against the model's own variables, so a
wrong file fails with the key named.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import numpy as np

# Flax leaf name per collection → timm's name for it.
_PARAM_NAMES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}
_STAT_NAMES = {'mean': 'running_mean', 'var': 'running_var'}
# Flax kernel axes → torch weight axes, by kernel rank (Dense, Conv1d, Conv2d).
_KERNEL_TO_TORCH = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}


class ArchitectureMismatch(ValueError):
    """A state dict does not fit the backbone it is meant for; the message says where."""


def numbered_modules(name: str) -> str:
    """Flax names list submodules `blocks_3`; torch's `nn.ModuleList` says `blocks.3`."""
    return re.sub(r'_(\d+)$', r'.\1', name)


def _torch_key(collection: str, path: tuple[str, ...],
               rename_module: Callable[[str], str]) -> str:
    *modules, leaf = path
    names = _STAT_NAMES if collection == 'batch_stats' else _PARAM_NAMES
    return '.'.join([rename_module(module) for module in modules] + [names.get(leaf, leaf)])


def parameter_key(path: tuple[str, ...]) -> str:
    """timm's name of a params leaf (`blocks_0/attn/qkv/kernel` → `blocks.0.attn.qkv.weight`)."""
    return _torch_key('params', path, numbered_modules)


def _kernel_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
    """The flax → torch transpose of a leaf, or None if it keeps its layout."""
    if path[-1] != 'kernel':
        return None
    if ndim not in _KERNEL_TO_TORCH:
        raise ValueError(f'no torch layout for a {ndim}-d kernel at {"/".join(path)}')
    return _KERNEL_TO_TORCH[ndim]


def _batches_tracked(running_mean_key: str) -> str:
    """torch BatchNorm's step counter beside its running mean."""
    return running_mean_key.removesuffix('running_mean') + 'num_batches_tracked'


def _flat_variables(variables: Mapping[str, Any]):
    for collection, tree in variables.items():
        for path, leaf in flax.traverse_util.flatten_dict(dict(tree)).items():
            yield collection, tuple(path), leaf


def to_state_dict(variables: Mapping[str, Any],
                  rename_module: Callable[[str], str] = numbered_modules,
                  ) -> dict[str, np.ndarray]:
    """Flax variables ({'params': ...[, 'batch_stats': ...]}) → torch state dict (NumPy).

    `num_batches_tracked` is written as 0: torch reads it only when a BatchNorm's
    momentum is None, which timm's models never use.
    """
    state_dict = {}
    for collection, path, leaf in _flat_variables(variables):
        value = np.asarray(leaf)
        axes = _kernel_axes(path, value.ndim)
        key = _torch_key(collection, path, rename_module)
        if key in state_dict:
            raise ValueError(f'two variables map to the torch key {key!r}')
        state_dict[key] = np.ascontiguousarray(value if axes is None
                                               else value.transpose(axes))
        if collection == 'batch_stats' and path[-1] == 'mean':
            state_dict[_batches_tracked(key)] = np.zeros((), np.int64)
    return state_dict


def from_state_dict(state_dict: Mapping[str, Any], abstract_variables: Mapping[str, Any],
                    rename_module: Callable[[str], str] = numbered_modules,
                    source: str = 'the state dict') -> dict[str, Any]:
    """The inverse of `to_state_dict`, shaped and typed like `abstract_variables`.

    Strict like torch's `load_state_dict(strict=True)`: a missing key, an unexpected key
    or a shape that differs raises `ArchitectureMismatch` naming it and `source`.
    """
    variables = {}
    used = set()
    for collection, path, abstract in _flat_variables(abstract_variables):
        key = _torch_key(collection, path, rename_module)
        if key not in state_dict:
            raise ArchitectureMismatch(f'{source} has no {key!r}, which the requested '
                                       'backbone needs')
        value = np.asarray(state_dict[key])
        axes = _kernel_axes(path, value.ndim)
        if axes is not None:
            value = value.transpose(np.argsort(axes))
        if value.shape != tuple(abstract.shape):
            torch_shape = np.asarray(state_dict[key]).shape
            expected = tuple(abstract.shape) if axes is None else tuple(
                abstract.shape[axis] for axis in axes)
            raise ArchitectureMismatch(
                f'{source}: {key!r} has shape {tuple(torch_shape)}, the requested backbone '
                f'expects {expected}')
        variables.setdefault(collection, {})[path] = value.astype(abstract.dtype)
        used.add(key)
        if collection == 'batch_stats' and path[-1] == 'mean':
            used.add(_batches_tracked(key))
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        shown = ', '.join(repr(key) for key in unexpected[:5])
        raise ArchitectureMismatch(f'{source} has {len(unexpected)} keys the requested '
                                   f'backbone does not: {shown}')
    return {collection: flax.traverse_util.unflatten_dict(flat)
            for collection, flat in variables.items()}
