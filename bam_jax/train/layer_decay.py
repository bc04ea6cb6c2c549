"""Layer-wise learning-rate decay: one lr scale per parameter, as timm's fine-tuning.

timm's `param_groups_layer_decay` (what `create_optimizer_v2(..., layer_decay=d)` and
`train.py --layer-decay d` use) gives each parameter a layer id and the scale
`d ** (num_layers - 1 - id)`, so the classifier trains at the full rate and the stem at the
smallest. How the ids are assigned is per family, and this module reproduces timm's:

* ViT (`group_matcher`): embeddings (patch, position, CLS) 0; block i, i + 1; the final
  norm shares the last block's id (timm's `MATCH_PREV_GROUP`), and the classifier is one
  layer above: depth + 1. (BEiT/MAE put the final norm with the head; timm does not.)
* ResNet (`group_matcher(coarse=False)`): stem 0, then one id per bottleneck block across
  the stages (`layer1.0` is 1, ...), classifier last: block-wise, not stage-wise.
* CAFormer: timm's MetaFormer has no `group_matcher`, so timm groups its parameters 12 at a
  time in the module's own parameter order (`auto_group_layers`), about two blocks per
  group, and gives the classifier `head.fc.fc2` (its pretrained config's 'classifier') the
  top id. timm's CAFormer head `head.fc.fc1` and `head.fc.norm` count as trunk there.

Fine-tuning always adds a classifier, and timm counts its layer: so do the scales here,
whether or not `params` holds it. Any leaf that is not a backbone parameter (named as the
fine-tuning task names its classifier) gets the top layer, scale 1; for CAFormer, leaves
named like timm's `MlpHead` (`head/fc/fc1`, `head/fc/norm`) are the trunk's last, as in timm.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import jax
import numpy as np

from bam_jax.models import resnet
from bam_jax.models.torch_layout import parameter_key
from bam_jax.models.vit import vit

BACKBONE_KEY = 'backbone'  # `MultiCropNetwork`'s name for the backbone's params
# timm's `auto_group_layers(layers_per_group=12)`: parameters per group without a matcher.
AUTO_GROUP_SIZE = 12
# timm's MetaFormer module order (`named_parameters`), numbers written as '#'.
_CAFORMER_ORDER = (
    'stem.conv', 'stem.norm', 'stages.#.downsample.norm', 'stages.#.downsample.conv',
    'stages.#.blocks.#.norm1', 'stages.#.blocks.#.token_mixer.pwconv1',
    'stages.#.blocks.#.token_mixer.dwconv', 'stages.#.blocks.#.token_mixer.pwconv2',
    'stages.#.blocks.#.token_mixer.qkv', 'stages.#.blocks.#.token_mixer.proj',
    'stages.#.blocks.#.norm2', 'stages.#.blocks.#.mlp.fc1', 'stages.#.blocks.#.mlp.fc2',
    'head.norm', 'head.fc.fc1', 'head.fc.norm')
_LEAF_ORDER = ('weight', 'bias')


def _matched(names: list[str], rules) -> dict[str, int]:
    """{name: layer} by the first (regex, match → layer) rule that matches its start."""
    layers = {}
    for name in names:
        for pattern, layer in rules:
            match = re.match(pattern, name)
            if match:
                layers[name] = layer(match)
                break
    return layers


def _vit_layers(names: list[str], model_config: Mapping[str, Any]) -> tuple[dict, int]:
    config = {key: value for key, value in model_config.items()
              if key not in ('name', 'attention')}
    depth = vit(config.pop('variant'), **config).depth
    return _matched(names, [
        (r'cls_token|reg_token|pos_embed|patch_embed|norm_pre', lambda _: 0),
        (r'blocks\.(\d+)\.', lambda match: int(match[1]) + 1),
        (r'norm\.', lambda _: depth),
    ]), depth + 2


def _resnet_layers(names: list[str], model_config: Mapping[str, Any]) -> tuple[dict, int]:
    depths = resnet.ResNet(**{key: value for key, value in model_config.items()
                              if key != 'name'}).stage_depths
    first_block = np.cumsum([0, *depths])  # blocks before each stage
    return _matched(names, [
        (r'conv1\.|bn1\.', lambda _: 0),
        (r'layer(\d+)\.(\d+)\.',
         lambda match: int(first_block[int(match[1]) - 1]) + int(match[2]) + 1),
    ]), int(first_block[-1]) + 2


def _caformer_position(name: str) -> tuple | None:
    """Sort key of a parameter in timm's MetaFormer order, None if not in its trunk."""
    module, _, leaf = name.rpartition('.')
    template = re.sub(r'\.\d+(?=\.|$)', '.#', module)
    if template not in _CAFORMER_ORDER or leaf not in _LEAF_ORDER:
        return None
    top = ('stem', 'stages', 'head').index(module.split('.')[0])
    numbers = [int(number) for number in re.findall(r'\.(\d+)(?=\.|$)', module)]
    stage, block = (numbers + [-1, -1])[:2]  # downsampling (no block) precedes blocks
    return top, stage, block, _CAFORMER_ORDER.index(template), _LEAF_ORDER.index(leaf)


def _caformer_layers(names: list[str], model_config: Mapping[str, Any]
                     ) -> tuple[dict, int]:
    del model_config  # the order and count of the parameters say it all
    trunk = sorted((name for name in names if _caformer_position(name) is not None),
                   key=_caformer_position)
    layers = {name: index // AUTO_GROUP_SIZE for index, name in enumerate(trunk)}
    return layers, -(-len(trunk) // AUTO_GROUP_SIZE) + 1


_FAMILIES = {'vit': _vit_layers, 'resnet50': _resnet_layers,
             'caformer_m36': _caformer_layers}


def layer_ids(params: Mapping[str, Any], model_config: Mapping[str, Any]
              ) -> tuple[dict[str, int], int]:
    """({timm parameter name: layer id}, number of layers, the classifier's included);
    names without an id are the classifier's, the top layer."""
    name = model_config['name']
    if name not in _FAMILIES:
        raise ValueError(f'no layer-wise decay for config.model.name {name!r}; known: '
                         f'{sorted(_FAMILIES)}')
    names = [_timm_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    layers, num_layers = _FAMILIES[name](names, model_config)
    if not layers:  # e.g. the backbone under another name: every scale would be 1
        raise ValueError(f'no parameter of a {name} backbone (timm names) among '
                         f'{names[:3]}...; pass its params, or hold them under "backbone"')
    return layers, num_layers


def _timm_name(path) -> str:
    """timm's name of a leaf, the backbone's own whether or not it sits under 'backbone'
    (as in the pretraining network)."""
    keys = tuple(str(getattr(key, 'key', key)) for key in path)
    return parameter_key(keys[1:] if keys[0] == BACKBONE_KEY and len(keys) > 1 else keys)


def layer_decay_scales(params: Mapping[str, Any], model_config: Mapping[str, Any],
                       decay: float) -> Any:
    """The lr scale of every leaf of `params` (same structure): `decay ** (num_layers -
    1 - layer_id)`, timm's; all ones for decay 1.

    Args:
      params: the backbone's params (timm's names, see `bam_jax.models.timm_names`),
        possibly with the fine-tuning classifier beside them at the top level; or a
        tree holding them under 'backbone' beside the classifier.
      model_config: `config.model` of the backbone.
      decay: timm's `layer_decay`, e.g. 0.65 (BEiT/MAE ViT-B) or 0.75.
    """
    layers, num_layers = layer_ids(params, model_config)
    top = num_layers - 1

    def scale(path, leaf):
        del leaf
        return float(decay ** (top - layers.get(_timm_name(path), top)))

    return jax.tree_util.tree_map_with_path(scale, params)
