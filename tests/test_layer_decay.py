"""Layer-wise lr decay (`bam_jax.train.layer_decay`) against timm's optimizer factory.

One timm child builds each backbone as `timm_names` specifies it, with a 10-class
classifier, on the meta device (no memory, no init), calls `create_optimizer_v2(...,
layer_decay=0.65)` and reports every parameter's `lr_scale` by name; ours come from the
backbone's abstract params plus a classifier named as timm names it.
"""

import jax
import jax.numpy as jnp
import pytest

from bam_jax.models import caformer, resnet
from bam_jax.models.timm_names import create_model_line, timm_backbone
from bam_jax.models.torch_layout import parameter_key
from bam_jax.models.vit import vit
from bam_jax.train.layer_decay import layer_decay_scales
from conftest import timm_child

DECAY = 0.65
CLASSES = 10
MODELS = {
    'vit_tiny': dict(name='vit', variant='tiny', depth=3, embed_dim=32, num_heads=2,
                     img_size=32, drop_path_rate=0.1),
    'vit_small': dict(name='vit', variant='small'),
    'resnet_tiny': dict(name='resnet50', stage_depths=(1, 2, 1, 1), width=8),
    'resnet50': dict(name='resnet50'),
    # Stage 2 keeps stage 1's width: no downsampling there.
    'caformer_tiny': dict(name='caformer_m36', depths=(1, 2, 3, 1), dims=(32, 32, 64, 96)),
    'caformer_m36': dict(name='caformer_m36'),
}

TIMM_SCALES = r'''
import json, sys
import timm, torch
from timm.optim import create_optimizer_v2

jobs_path, _, out_path = sys.argv[1:4]
scales = {}
for name, line in json.load(open(jobs_path)).items():
    exec(line)  # model = ...
    if not getattr(model, 'pretrained_cfg', None):  # a MetaFormer class: the registered CAFormer's config
        model.pretrained_cfg = timm.models.get_pretrained_cfg('caformer_m36').to_dict()
    optimizer = create_optimizer_v2(model, 'adamw', lr=1.0, weight_decay=0.05,
                                    layer_decay=%r)
    by_id = {id(p): n for n, p in model.named_parameters()}
    scales[name] = {by_id[id(p)]: group['lr_scale']
                    for group in optimizer.param_groups for p in group['params']}
import numpy as np
np.savez(out_path)
json.dump({'tensorflow_imported': 'tensorflow' in sys.modules, 'scales': scales},
          open(out_path + '.json', 'w'))
''' % DECAY


def backbone(model_config):
    """(abstract params with a classifier named as timm's, the timm model line)."""
    config = dict(model_config)
    name = config.pop('name')
    if name == 'vit':
        module, head = vit(config.pop('variant'), **config), {'head': ['kernel', 'bias']}
    elif name == 'resnet50':
        module, head = resnet.ResNet(**config), {'fc': ['kernel', 'bias']}
    else:
        module = caformer.CAFormer(**config)
        head = {'fc1': ['kernel', 'bias'], 'norm': ['scale', 'bias'],
                'fc2': ['kernel', 'bias']}
    size = getattr(module, 'img_size', 64)
    params = jax.eval_shape(module.init, jax.random.key(0),
                            jnp.zeros((1, size, size, 3)))['params']
    classifier = {module_name: {leaf: jax.ShapeDtypeStruct((), jnp.float32)
                                for leaf in leaves} for module_name, leaves in head.items()}
    if name == 'caformer_m36':
        params = {**params, 'head': {**params['head'], 'fc': classifier}}
    else:
        params = {**params, **classifier}
    spec = timm_backbone(name).model_spec(model_config)
    spec['model_kwargs'].update(num_classes=CLASSES, device='meta')
    return params, create_model_line(spec)


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
    params, lines = {}, {}
    for name, model_config in MODELS.items():
        params[name], lines[name] = backbone(model_config)
    _, report = timm_child(TIMM_SCALES, lines, {}, tmp_path_factory.mktemp('timm'))
    return params, report['scales']


@pytest.mark.parametrize('name', MODELS)
def test_scales_equal_timms(compared, name):
    params, timm_scales = compared
    scales = layer_decay_scales(params[name], MODELS[name], DECAY)
    ours = {parameter_key(tuple(key.key for key in path)): scale
            for path, scale in jax.tree_util.tree_flatten_with_path(scales)[0]}
    assert sorted(ours) == sorted(timm_scales[name])
    for parameter, scale in timm_scales[name].items():
        assert ours[parameter] == pytest.approx(scale, rel=1e-12), parameter
    assert max(ours.values()) == 1.0
    assert len(set(ours.values())) > 3  # more than stem, body, classifier


def test_structure_and_no_decay(compared):
    params, _ = compared
    scales = layer_decay_scales(params['vit_tiny'], MODELS['vit_tiny'], 1.0)
    assert jax.tree.structure(scales) == jax.tree.structure(params['vit_tiny'])
    assert set(jax.tree.leaves(scales)) == {1.0}
    # ViT-tiny of depth 3: embeddings 0, blocks 1-3, final norm with block 3, head 4.
    scales = layer_decay_scales(params['vit_tiny'], MODELS['vit_tiny'], 0.5)
    assert scales['cls_token'] == scales['patch_embed']['proj']['kernel'] == 0.5 ** 4
    assert scales['blocks_0']['attn']['qkv']['kernel'] == 0.5 ** 3
    assert scales['norm']['scale'] == scales['blocks_2']['mlp']['fc2']['bias'] == 0.5
    assert scales['head']['kernel'] == 1.0
    with pytest.raises(ValueError, match='no layer-wise decay'):
        layer_decay_scales(params['vit_tiny'], {'name': 'mlp'}, 0.5)
    # The backbone under 'backbone' (the pretraining network's name), the head beside it.
    backbone = {key: value for key, value in params['vit_tiny'].items() if key != 'head'}
    nested = layer_decay_scales({'backbone': backbone, 'head': params['vit_tiny']['head']},
                                MODELS['vit_tiny'], 0.5)
    assert nested == {'backbone': {key: value for key, value in scales.items()
                                   if key != 'head'}, 'head': scales['head']}
    with pytest.raises(ValueError, match='no parameter of a vit backbone'):
        layer_decay_scales({'student': backbone}, MODELS['vit_tiny'], 0.5)
