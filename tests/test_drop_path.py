"""Drop path (stochastic depth) in every backbone against timm's.

One timm child builds each tiny backbone with `drop_path_rate`, loads our weights, reports
every block's `DropPath.drop_prob`, and runs a training-mode forward pass in which timm's
`drop_path` takes its keep masks from a list; ours takes the same masks in the same
order (`stochastic_depth.keep_mask` replaced), so the outputs must agree.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bam_jax.export import timm_spec
from bam_jax.models import stochastic_depth
from bam_jax.models.caformer import CAFormer
from bam_jax.models.resnet import ResNet
from bam_jax.models.timm_names import create_model_line, timm_backbone
from bam_jax.models.torch_layout import numbered_modules
from bam_jax.models.vit import vit
from conftest import timm_child

BATCH, RATE = 6, 0.3
MODELS = {
    'vit': dict(name='vit', variant='tiny', depth=4, embed_dim=32, num_heads=2,
                img_size=32),
    'resnet50': dict(name='resnet50', stage_depths=(1, 2, 1, 2), width=8),
    # Rematerialised blocks (the shipped CAFormer config's): the same numbers.
    'caformer_m36': dict(name='caformer_m36', depths=(1, 2, 2, 1), dims=(32, 32, 64, 64),
                         remat=True),
}

TIMM_DROP_PATH = r'''
import json, sys
import numpy as np
import timm, torch
import timm.layers.drop

jobs_path, arrays_path, out_path = sys.argv[1:4]
arrays = dict(np.load(arrays_path))
outputs, report = {}, {'tensorflow_imported': False, 'rates': {}, 'seen': {}}
for name, line in json.load(open(jobs_path)).items():
    exec(line)  # model = ...
    prefix = name + '/state/'
    model.load_state_dict({k[len(prefix):]: torch.from_numpy(v) for k, v in arrays.items()
                           if k.startswith(prefix)}, strict=True, assign=True)
    rates = report['rates'][name] = {}
    for module_name, module in model.named_modules():
        for attribute in ('drop_path', 'drop_path1', 'drop_path2'):
            if module_name and hasattr(module, attribute):
                rates.setdefault(module_name, set()).add(
                    getattr(getattr(module, attribute), 'drop_prob', 0.0))
    report['rates'][name] = {k: sorted(v) for k, v in rates.items()}
    masks, seen = arrays[name + '/masks'], report['seen'].setdefault(name, [])

    def forced(x, drop_prob=0., training=False, scale_by_keep=True):
        if drop_prob == 0. or not training:
            return x
        keep = torch.from_numpy(masks[len(seen)]).to(x.dtype)
        seen.append(drop_prob)
        return x * (keep / (1 - drop_prob)).view((x.shape[0],) + (1,) * (x.ndim - 1))

    timm.layers.drop.drop_path = forced
    model.train()
    with torch.no_grad():
        images = torch.from_numpy(arrays[name + '/images']).permute(0, 3, 1, 2)
        outputs[name] = model(images.contiguous()).numpy()
np.savez(out_path, **outputs)
report['tensorflow_imported'] = 'tensorflow' in sys.modules
json.dump(report, open(out_path + '.json', 'w'))
'''


def build(model_config, rate=RATE):
    config = {key: value for key, value in model_config.items() if key != 'name'}
    config['drop_path_rate'] = rate
    if model_config['name'] == 'vit':
        return vit(config.pop('variant'), **config)
    return (ResNet if model_config['name'] == 'resnet50' else CAFormer)(**config)


def random_variables(model, seed):
    """Every param random (a zero-initialised last BN would hide the branch)."""
    rng = np.random.default_rng(seed)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return {collection: jax.tree.map(
        lambda s: (rng.normal(size=s.shape) * 0.2 + (collection == 'batch_stats')
                   ).astype(np.float32), tree) for collection, tree in variables.items()}


def block_rates(model, variables, images) -> dict[str, float]:
    """{timm module name: rate} of every module with a `drop_path_rate`, the top one aside."""
    rates = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == '__call__' and context.module.path and hasattr(
                context.module, 'drop_path_rate'):
            name = '.'.join(numbered_modules(part) for part in context.module.path)
            rates[name] = context.module.drop_path_rate
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.apply(variables, images))
    return rates


def masked(model, variables, images, masks, monkeypatch):
    """Training-mode features with `keep_mask` handing out `masks` in call order, and
    the rates asked for, in that order."""
    calls = []

    def forced(key, keep_prob, shape):
        del key
        calls.append(1.0 - keep_prob)
        return jnp.asarray(masks[len(calls) - 1]).reshape(shape)

    monkeypatch.setattr(stochastic_depth, 'keep_mask', forced)

    features, _ = jax.jit(lambda v, x: model.apply(
        v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}))(
            variables, images)
    return np.asarray(features), calls


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
    ours, lines, arrays = {}, {}, {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for seed, (name, model_config) in enumerate(MODELS.items()):
            model = build(model_config)
            variables = random_variables(model, seed)
            rng = np.random.default_rng(seed)
            images = rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
            masks = rng.random((40, BATCH)) < 0.5
            masks[:, 0], masks[:, 1] = True, False  # both branches in every call
            features, calls = masked(model, variables, images, masks, monkeypatch)
            ours[name] = (features, calls, block_rates(model, variables, images))
            spec = timm_backbone(name).model_spec(model_config)
            spec['model_kwargs'].update(drop_path_rate=RATE, device='meta')
            lines[name] = create_model_line(spec)
            state = timm_backbone(name).to_timm(variables)
            arrays.update({f'{name}/state/{key}': value for key, value in state.items()})
            arrays.update({f'{name}/images': images, f'{name}/masks': masks})
    timm, report = timm_child(TIMM_DROP_PATH, lines, arrays,
                              tmp_path_factory.mktemp('timm'))
    return ours, timm, report


@pytest.mark.parametrize('name', MODELS)
def test_rates_and_masked_outputs_equal_timms(compared, name):
    ours, timm, report = compared
    features, calls, rates = ours[name]
    timm_rates = report['rates'][name]
    assert sorted(rates) == sorted(timm_rates)  # every block, by timm's name
    for block, rate in rates.items():
        assert len(timm_rates[block]) == 1, block  # one rate per block (both branches)
        assert rate == pytest.approx(timm_rates[block][0], rel=1e-6, abs=1e-12), block
    assert max(rates.values()) == pytest.approx(RATE) and min(rates.values()) == 0.0
    # A mask per branch with a rate above 0, asked for in the same order.
    np.testing.assert_allclose(calls, report['seen'][name], rtol=1e-6)
    assert len(calls) == (1 if name == 'resnet50' else 2) * (len(rates) - 1)
    # Measured: ViT 2e-7, CAFormer 6e-7, ResNet 3e-5 (batch statistics of 6 images) of
    # outputs up to 2; a branch dropped or kept differently moves them by O(1).
    np.testing.assert_allclose(features, timm[name], rtol=0,
                               atol=1e-4 * np.abs(timm[name]).max())


def test_rate_schedules():
    assert stochastic_depth.linear_rates(0.1, 1) == [0.0]
    assert stochastic_depth.linear_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    stages = stochastic_depth.stage_rates(0.5, (1, 2, 0, 3))
    assert [len(stage) for stage in stages] == [1, 2, 0, 3]
    assert sum(stages, []) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])


@pytest.mark.parametrize('name', ['vit'])
def test_inactive_outside_training_and_jit_traces(name):
    """Evaluation, or training without a 'dropout' rng, is the rate-0 network; with one,
    the jitted pass drops and the gradient traces through remat. (Every family calls the
    same `drop_path`; the fixture above runs each in training.)"""
    model_config = {**MODELS[name], 'remat': True}
    model, plain = build(model_config), build(model_config, rate=0.0)
    variables = random_variables(model, 3)
    images = np.random.default_rng(3).normal(size=(4, 32, 32, 3)).astype(np.float32)
    mutable = ['batch_stats'] if 'batch_stats' in variables else False

    def train(network, params, rngs):
        return jax.tree.leaves(network.apply({**variables, 'params': params}, images,
                                             train=True, mutable=mutable, rngs=rngs))[0]

    def outputs(params, key):
        """Evaluation and training without a 'dropout' rng by both networks, and
        training with one; one compilation."""
        return (model.apply({**variables, 'params': params}, images),
                plain.apply({**variables, 'params': params}, images),
                train(model, params, {}), train(plain, params, {}),
                train(model, params, {'dropout': key}))

    evaluated, plain_evaluated, trained, plain_trained, dropped = jax.jit(outputs)(
        variables['params'], jax.random.key(1))
    np.testing.assert_array_equal(evaluated, plain_evaluated)
    np.testing.assert_array_equal(trained, plain_trained)
    assert np.isfinite(dropped).all()
    assert np.abs(dropped - trained).max() > 1e-3 * np.abs(trained).max()
    grads = jax.eval_shape(jax.grad(lambda params, key: jnp.sum(
        train(model, params, {'dropout': key}))), variables['params'], jax.random.key(0))
    assert jax.tree.structure(grads) == jax.tree.structure(variables['params'])


@pytest.mark.parametrize('name', MODELS)
def test_export_spec_carries_no_drop_path(name):
    """An exported backbone is for evaluation: its timm model has no stochastic depth."""
    spec = timm_spec({**MODELS[name], 'drop_path_rate': 0.2})
    assert spec == timm_spec({**MODELS[name], 'drop_path_rate': 0.0})
    assert 'drop_path_rate' not in spec['model_kwargs']
