"""Flax variables ↔ PyTorch state dicts, for backbones whose flax names follow timm's.

A flax path maps to a torch key by joining the module names with dots, a numbered
module `layer1_0` becoming `layer1.0` (flax names list entries `name_i`, torch
`name.i`). Leaves are renamed and transposed to torch's layout: Dense `kernel`
[in, out] → `weight` [out, in]; Conv `kernel` [kh, kw, in/groups, out] → `weight`
[out, in/groups, kh, kw]; norm `scale` → `weight`; BatchNorm statistics `mean`, `var` →
`running_mean`, `running_var`. Loading goes the other way and checks every key and
shape against the model's own variables, so a wrong file fails with the key named.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import jax
import numpy as np

_PARAM_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
_STATISTIC_NAMES = {'mean': 'running_mean', 'var': 'running_var'}
# Conv kernel [kh, kw, in, out] ↔ torch [out, in, kh, kw].
_CONV_TO_TORCH = (3, 2, 0, 1)
_CONV_FROM_TORCH = (2, 3, 1, 0)


def torch_key(path: tuple[str, ...], collection: str = 'params') -> str:
    """('layer1_0', 'conv1', 'kernel') → 'layer1.0.conv1.weight'."""
    *modules, leaf = path
    names = _PARAM_NAMES if collection == 'params' else _STATISTIC_NAMES
    if leaf not in names:
        raise ValueError(f'No torch name for the {collection} leaf {"/".join(path)!r}.')
    return '.'.join([re.sub(r'_(\d+)$', r'.\1', module) for module in modules]
                    + [names[leaf]])


def _relayout(leaf: str, array: np.ndarray, *, to_torch: bool) -> np.ndarray:
    """Transposes a kernel between flax's and torch's layouts; other leaves as they are."""
    if leaf != 'kernel' or array.ndim not in (2, 4):
        return array
    if array.ndim == 2:
        return array.T
    return array.transpose(_CONV_TO_TORCH if to_torch else _CONV_FROM_TORCH)


def _leaves(tree) -> list[tuple[tuple[str, ...], Any]]:
    return [(tuple(str(key.key) for key in path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`{'params': ..., 'batch_stats': ...}` → torch-named float32 NumPy arrays."""
    state_dict = {}
    for collection, tree in variables.items():
        for path, leaf in _leaves(tree):
            array = np.asarray(jax.device_get(leaf), np.float32)
            state_dict[torch_key(path, collection)] = np.ascontiguousarray(
                _relayout(path[-1], array, to_torch=True))
    return state_dict


def from_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, Any],
                    ignored_suffixes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The inverse of `to_state_dict`, strict: every key used, every shape checked.

    Args:
      state_dict: torch key → array (NumPy, or anything `np.asarray` takes).
      expected: the model's variables or their shapes (`jax.eval_shape` of `init`);
        the result has exactly this structure, as float32 NumPy arrays.
      ignored_suffixes: keys ending in these are allowed and dropped (e.g. BatchNorm's
        `num_batches_tracked`).
    """
    unused = {key for key in state_dict if not key.endswith(ignored_suffixes)}
    missing = []
    leaves = {}
    for collection, tree in expected.items():
        leaves[collection] = []
        for path, leaf in _leaves(tree):
            key = torch_key(path, collection)
            if key not in state_dict:
                missing.append(key)
                continue
            unused.discard(key)
            array = _relayout(path[-1], np.asarray(state_dict[key], np.float32),
                              to_torch=False)
            if array.shape != tuple(leaf.shape):
                needed = _relayout(path[-1], np.empty(leaf.shape), to_torch=True).shape
                raise ValueError(f'State dict key {key!r} has shape '
                                 f'{np.shape(state_dict[key])}; the model needs {needed}.')
            leaves[collection].append(array)
    if missing or unused:
        raise ValueError(f'State dict does not match the model: missing keys '
                         f'{sorted(missing)[:5]}{"..." if len(missing) > 5 else ""}, '
                         f'unexpected keys {sorted(unused)[:5]}'
                         f'{"..." if len(unused) > 5 else ""}.')
    return {collection: jax.tree.unflatten(jax.tree.structure(tree), leaves[collection])
            for collection, tree in expected.items()}
