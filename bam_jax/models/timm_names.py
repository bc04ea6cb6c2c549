"""Which timm model each backbone is, one entry per `config.model.name`.

The renaming and layout changes shared by every backbone live in `torch_layout`; a
`TimmBackbone` entry adds what is particular to one family: how its module names map
to timm's, which timm model (constructor and keyword arguments) has exactly the same
architecture, and which official run arguments name it.

A spec is JSON (it is written beside every export and checked on import):
'model_name' is timm's registered name, or 'model_class' a timm class for shapes timm
does not register; 'model_kwargs' are plain values; 'model_layers' maps the arguments
that are torch layers to the Python expression (over `import timm`) that gives them.
`create_model_line` renders a spec as the line that builds the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bam_jax.models import caformer, resnet, torch_layout
from bam_jax.models.torch_layout import ArchitectureMismatch, numbered_modules
from bam_jax.models.vit import vit

__all__ = ['ArchitectureMismatch', 'BACKBONES', 'TimmBackbone', 'create_model_line',
           'timm_backbone']


@dataclasses.dataclass(frozen=True)
class TimmBackbone:
    """How one backbone family maps to timm.

    Attributes:
      model_spec: `config.model` → the spec (see the module docstring) of the timm
        model whose state dict and outputs equal the backbone's.
      rename_module: a Flax module name → the torch module name.
      official_args: `config.model` → the official run arguments (`args` in an official
        checkpoint) that must match for its backbone to be this one, e.g. `arch`.
    """
    model_spec: Callable[[Mapping[str, Any]], dict[str, Any]]
    rename_module: Callable[[str], str] = numbered_modules
    official_args: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None

    def to_timm(self, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return torch_layout.to_state_dict(variables, self.rename_module)

    def from_timm(self, state_dict: Mapping[str, np.ndarray],
                  abstract_variables: Mapping[str, Any],
                  source: str = 'the state dict') -> dict[str, Any]:
        return torch_layout.from_state_dict(state_dict, abstract_variables,
                                            self.rename_module, source)


def vit_model_spec(model_config: Mapping[str, Any]) -> dict[str, Any]:
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
    # Train-time only: drop_path_rate is 0 at evaluation; remat and the attention's
    # implementation do not change outputs.
    model.pop('drop_path_rate', None)
    model.pop('remat', None)
    model.pop('attention', None)
    variant = model.pop('variant')
    module = vit(variant, **model)
    kwargs = dict(
        img_size=module.img_size, patch_size=module.patch_size,
        embed_dim=module.embed_dim, depth=module.depth, num_heads=module.num_heads,
        mlp_ratio=module.mlp_ratio, qkv_bias=module.qkv_bias,
        class_token=True, global_pool='token', num_classes=0, fc_norm=False,
        no_embed_class=False, reg_tokens=0, pre_norm=False, init_values=None,
        dynamic_img_size=True)
    return {'model_name': f'vit_{variant}_patch16_224', 'model_kwargs': kwargs}


def vit_official_args(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The official `--arch vit_<variant> --patch_size P` of this ViT."""
    return {'arch': f'vit_{model_config["variant"]}',
            'patch_size': model_config['patch_size']}


def resnet_model_spec(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """timm's `resnet50`, with `layers` / `channels` for other depths and widths."""
    kwargs = resnet.timm_model_kwargs(model_config)
    return {'model_name': kwargs.pop('model_name'), 'model_kwargs': kwargs}


# CAFormer arguments that are torch layers → how `timm` gives the named layer.
_CAFORMER_LAYERS = {
    'mlp_act': 'timm.layers.get_act_layer({!r})',
    'act1_layer': 'timm.layers.get_act_layer({!r})',
    'token_mixers': 'timm.models.metaformer.{}',
    'norm_layers': 'timm.models.metaformer.{}',
}


def caformer_model_spec(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """timm's `caformer_m36` (or `MetaFormer` for other shapes) as the official code
    configures it: GELU activations, no res-scale (see `caformer.timm_model_kwargs`)."""
    kwargs = caformer.timm_model_kwargs(model_config)
    spec = {'model_name': kwargs.pop('model_name', None)}
    if 'model_class' in kwargs:
        spec['model_class'] = f'timm.models.metaformer.{kwargs.pop("model_class")}'
    layers = {}
    for key, template in _CAFORMER_LAYERS.items():
        value = kwargs.pop(key, None)
        if isinstance(value, str):
            layers[key] = template.format(value)
        elif value is not None:
            layers[key] = f'[{", ".join(template.format(item) for item in value)}]'
    return {**spec, 'model_kwargs': kwargs, 'model_layers': layers}


def arch_official_args(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The official `--arch` of a backbone that timm (or `get_arch`) names like ours."""
    return {'arch': model_config['name']}


BACKBONES: dict[str, TimmBackbone] = {
    'vit': TimmBackbone(model_spec=vit_model_spec, official_args=vit_official_args),
    'resnet50': TimmBackbone(model_spec=resnet_model_spec,
                             official_args=arch_official_args),
    'caformer_m36': TimmBackbone(model_spec=caformer_model_spec,
                                 official_args=arch_official_args),
}


def create_model_line(spec: Mapping[str, Any]) -> str:
    """`model = ...`: the line that builds a spec's model once `timm` is imported."""
    arguments = [f'{key}={value!r}' for key, value in spec['model_kwargs'].items()]
    arguments += [f'{key}={code}' for key, code in spec.get('model_layers', {}).items()]
    if spec.get('model_class'):
        return f'model = {spec["model_class"]}({", ".join(arguments)})'
    return f'model = timm.create_model({", ".join([repr(spec["model_name"]), *arguments])})'


def timm_backbone(name: str) -> TimmBackbone:
    """The entry for `config.model.name`, or a ValueError listing the known ones."""
    if name not in BACKBONES:
        raise ValueError(f'no timm conversion for config.model.name {name!r}; '
                         f'known: {sorted(BACKBONES)}')
    return BACKBONES[name]
