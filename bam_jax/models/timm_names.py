"""Backbone variables ↔ timm state dicts, one entry per `config.model.name`.

The Flax modules already carry timm's names, so a conversion is a renaming plus the
layout changes of each leaf kind (Dense `kernel` [in, out] is torch `weight` [out, in],
Conv `kernel` [kh, kw, in, out] is `weight` [out, in, kh, kw], norm `scale` is `weight`,
BatchNorm `mean`/`var` are `running_mean`/`running_var`). `flax_to_timm` and
`timm_to_flax` do that for any backbone (and add BatchNorm's `num_batches_tracked`,
which torch's strict loading requires); a `TimmBackbone` entry adds what is particular
to one family: how its module names map to timm's and which timm model (name and
keyword arguments) has exactly the same architecture.

To plug in another backbone (ResNet, CAFormer), write its entry next to its module and
add it to `BACKBONES` under its `config.model.name`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import numpy as np

from bam_jax.models.vit import vit

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


def _timm_key(collection: str, path: tuple[str, ...],
              rename_module: Callable[[str], str]) -> str:
    *modules, leaf = path
    names = _STAT_NAMES if collection == 'batch_stats' else _PARAM_NAMES
    return '.'.join([rename_module(module) for module in modules] + [names.get(leaf, leaf)])


def _kernel_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
    """The flax → torch transpose of a leaf, or None if it keeps its layout."""
    if path[-1] != 'kernel':
        return None
    if ndim not in _KERNEL_TO_TORCH:
        raise ValueError(f'no torch layout for a {ndim}-d kernel at {"/".join(path)}')
    return _KERNEL_TO_TORCH[ndim]


def _flat_variables(variables: Mapping[str, Any]):
    for collection, tree in variables.items():
        for path, leaf in flax.traverse_util.flatten_dict(dict(tree)).items():
            yield collection, tuple(path), leaf


def flax_to_timm(variables: Mapping[str, Any],
                 rename_module: Callable[[str], str] = numbered_modules,
                 ) -> dict[str, np.ndarray]:
    """Flax variables ({'params': ..., 'batch_stats': ...}) → timm state dict (NumPy)."""
    state_dict = {}
    for collection, path, leaf in _flat_variables(variables):
        value = np.asarray(leaf)
        axes = _kernel_axes(path, value.ndim)
        key = _timm_key(collection, path, rename_module)
        if key in state_dict:
            raise ValueError(f'two variables map to the timm key {key!r}')
        state_dict[key] = np.ascontiguousarray(value if axes is None
                                               else value.transpose(axes))
        if collection == 'batch_stats' and path[-1] == 'mean':
            state_dict[_batches_tracked(key)] = np.zeros((), np.int64)
    return state_dict


def _batches_tracked(running_mean_key: str) -> str:
    """torch BatchNorm's step counter beside its running mean; flax keeps none."""
    return running_mean_key.removesuffix('running_mean') + 'num_batches_tracked'


def timm_to_flax(state_dict: Mapping[str, np.ndarray],
                 abstract_variables: Mapping[str, Any],
                 rename_module: Callable[[str], str] = numbered_modules,
                 source: str = 'the state dict') -> dict[str, Any]:
    """The inverse of `flax_to_timm`, shaped and typed like `abstract_variables`.

    Strict like torch's `load_state_dict(strict=True)`: a missing key, an unexpected key
    or a shape that differs raises `ArchitectureMismatch` naming it and `source`.
    """
    variables = {}
    used = set()
    for collection, path, abstract in _flat_variables(abstract_variables):
        key = _timm_key(collection, path, rename_module)
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
                np.asarray(abstract.shape)[list(axes)])
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


@dataclasses.dataclass(frozen=True)
class TimmBackbone:
    """How one backbone family maps to timm.

    Attributes:
      model_spec: `config.model` → (timm model name, `timm.create_model` keyword
        arguments) of the timm model whose state dict and outputs equal the backbone's.
      rename_module: a Flax module name → the torch module name.
      official_args: `config.model` → the official run arguments (`args` in an official
        checkpoint) that must match for its backbone to be this one, e.g. `arch`.
    """
    model_spec: Callable[[Mapping[str, Any]], tuple[str, dict[str, Any]]]
    rename_module: Callable[[str], str] = numbered_modules
    official_args: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None

    def to_timm(self, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return flax_to_timm(variables, self.rename_module)

    def from_timm(self, state_dict: Mapping[str, np.ndarray],
                  abstract_variables: Mapping[str, Any],
                  source: str = 'the state dict') -> dict[str, Any]:
        return timm_to_flax(state_dict, abstract_variables, self.rename_module, source)


def vit_model_spec(model_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The timm ViT that computes what `bam_jax.models.vit` computes, as BAM builds it.

    Every architecture argument is explicit, since timm's defaults differ (its
    vit_small has 6 heads, BAM's 12, with the same parameter shapes). The name only
    picks timm's ViT class and its default preprocessing config; timm's ViT LayerNorm
    epsilon is 1e-6 like ours. `dynamic_img_size=True`
    resamples the position table per input size in the forward pass (bicubic,
    antialias), as the official pre-training and `resize_pos_embed` do; the table in
    the file stays that of `img_size`.
    """
    model = dict(model_config)
    if model.pop('name') != 'vit':
        raise ValueError(f'not a ViT config: {dict(model_config)}')
    # Train-time only: drop_path_rate is 0 at evaluation, remat does not change outputs.
    model.pop('drop_path_rate', None)
    model.pop('remat', None)
    variant = model.pop('variant')
    module = vit(variant, **model)
    kwargs = dict(
        img_size=module.img_size, patch_size=module.patch_size,
        embed_dim=module.embed_dim, depth=module.depth, num_heads=module.num_heads,
        mlp_ratio=module.mlp_ratio, qkv_bias=module.qkv_bias,
        class_token=True, global_pool='token', num_classes=0, fc_norm=False,
        no_embed_class=False, reg_tokens=0, pre_norm=False, init_values=None,
        dynamic_img_size=True)
    return f'vit_{variant}_patch16_224', kwargs


def vit_official_args(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The official `--arch vit_<variant> --patch_size P` of this ViT."""
    return {'arch': f'vit_{model_config["variant"]}',
            'patch_size': model_config['patch_size']}


BACKBONES: dict[str, TimmBackbone] = {
    'vit': TimmBackbone(model_spec=vit_model_spec, official_args=vit_official_args),
}


def timm_backbone(name: str) -> TimmBackbone:
    """The entry for `config.model.name`, or a ValueError listing the known ones."""
    if name not in BACKBONES:
        raise ValueError(f'no timm conversion for config.model.name {name!r}; '
                         f'known: {sorted(BACKBONES)}')
    return BACKBONES[name]
