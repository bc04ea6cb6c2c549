"""ResNet-50 and CAFormer-M36: sizes, init, BatchNorm, training on a mesh, timm parity.

The timm side runs in a subprocess that imports only NumPy, torch and timm (TensorFlow
and torch in one process crash), driven by the JSON jobs below.
"""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax import train as train_lib
from bam_jax.models import caformer, resnet
from bam_jax.models.caformer import CAFormer
from bam_jax.models.multicrop import build_network
from bam_jax.models.resnet import BatchNorm, ResNet
from configs import caformer_m36_imagenet, resnet50_imagenet
from conftest import data_mesh

# One test worker runs this module, so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group('backbones')

TINY_RESNET = dict(stage_depths=(1, 1, 1, 1), width=8)
TINY_CAFORMER = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
PARITY_TOLERANCE = 1e-4  # max |Δ| on fp32 features (the bar)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _flat(tree) -> dict[str, np.ndarray]:
    return {'/'.join(str(key.key) for key in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _images(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _key(seed=0):
    """Init keys for tests whose values do not matter: on this CPU, XLA compiles the
    'rbg' generator several times faster than the default threefry."""
    return jax.random.key(seed, impl='rbg')


def _random_variables(model, image_shape=(1, 32, 32, 3), seed=0):
    """Random values in the model's variable structure, without compiling its init."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, _key(), jnp.zeros(image_shape))
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


# ---------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize('config_module, backbone_count, statistics_count', [
    (resnet50_imagenet, 23_508_032, 53_120),   # 53 BNs: running mean + var
    (caformer_m36_imagenet, 52_548_480, 0),
])
def test_official_sizes_and_nothing_frozen(config_module, backbone_count,
                                           statistics_count):
    config = config_module.get_config()
    network = build_network(config)
    variables = jax.eval_shape(network.init, jax.random.key(0),
                               [jnp.zeros((2, 1, 224, 224, 3))])
    assert _count(variables['params']['backbone']) == backbone_count
    assert _count(variables.get('batch_stats', {})) == statistics_count
    width = 2048 if config_module is resnet50_imagenet else 576
    assert _count(variables['params']['projector']) == width * 4096 + 4096 + 2 * (
        4096 * 4096 + 4096)
    assert not any(jax.tree.leaves(train_lib.frozen_mask(variables['params'])))


def test_unknown_backbone_name_lists_the_valid_ones():
    config = resnet50_imagenet.get_config()
    config.model.name = 'resnet18'
    with pytest.raises(ValueError, match="'resnet18'.*'vit', 'resnet50', 'caformer_m36'"):
        build_network(config)


def test_resnet_config_is_the_papers_lars_run():
    config = resnet50_imagenet.get_config()
    schedules = train_lib.make_schedules(config, steps_per_epoch=100)
    assert config.optimizer.name == 'lars' and config.projector.activation == 'relu'
    assert float(schedules.learning_rate(10 * 100 - 1)) == pytest.approx(4.8)  # 0.3·16
    assert float(schedules.weight_decay(12345)) == pytest.approx(1e-6)
    assert (config.crops.n_global, config.crops.n_local) == (2, 6)
    assert config.optimizer.clip_grad == 0.3 and not config.data.ccrop


# ------------------------------------------------------------------------------ BatchNorm


def test_batch_norm_is_torchs():
    """Training normalises with the biased batch variance and moves the running
    variance toward the unbiased one, momentum 0.1; evaluation uses the running stats."""
    x = _images((3, 2, 2, 4), 0) * 2 + 1
    model = BatchNorm()
    variables = model.init(jax.random.key(0), x, train=False)
    variables = {'params': {'scale': jnp.arange(1.0, 5.0), 'bias': jnp.full(4, 0.5)},
                 'batch_stats': variables['batch_stats']}
    out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    values = x.reshape(-1, 4).astype(np.float64)
    mean, biased = values.mean(0), values.var(0)
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(biased + 1e-5)
                               * np.arange(1.0, 5.0) + 0.5, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(updates['batch_stats']['var'],
                               0.9 + 0.1 * values.var(0, ddof=1), rtol=1e-5)
    evaluated = model.apply({**variables, **updates}, x, train=False)
    np.testing.assert_allclose(
        evaluated, (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * values.var(0, ddof=1) + 1e-5)
        * np.arange(1.0, 5.0) + 0.5, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='more than one value per channel'):
        model.apply(variables, x[:1, :1, :1], train=True, mutable=['batch_stats'])


# ------------------------------------------------------- training on a mesh, and init


def tiny_backbone_config(config_module, model):
    config = config_module.get_config()
    config.batch_size = 8
    config.epochs = 10
    config.compute_dtype = 'float32'
    config.model = ml_collections.ConfigDict(dict(name=config.model.name, **model))
    config.projector.update(hidden_dim=32, out_dim=16)
    config.crops.update(global_size=32, local_size=16, n_local=2)
    config.loss.update(top_k=8)
    # No warm-up and a peak lr of 1, so the very first LARS update is visible.
    config.optimizer.update(lr=256 / config.batch_size, warmup_epochs=0)
    return config


def _batch(config, seed):
    shapes = train_lib.crop_shapes(config, config.batch_size)
    return {group: _images(shape, seed + index) for index, (group, shape)
            in enumerate(zip(('global', 'local'), shapes))}


def _place(batch, mesh):
    return jax.device_put(batch, NamedSharding(mesh, P(None, 'data')))


def _training(config_module, model):
    """A tiny run on 4 devices and a copy of its initial params (the step donates)."""
    config = tiny_backbone_config(config_module, model)
    training = train_lib.build_training(config, data_mesh(4), steps_per_epoch=5,
                                        rng=_key())
    return config, training, jax.device_get(training.state.params)


@pytest.fixture(scope='module')
def resnet_training():
    return _training(resnet50_imagenet, TINY_RESNET)


@pytest.fixture(scope='module')
def caformer_training():
    return _training(caformer_m36_imagenet, {**TINY_CAFORMER, 'remat': True})


def test_initialisation_follows_timm(resnet_training, caformer_training):
    for path, leaf in _flat(resnet_training[2]['backbone']).items():
        if path.endswith('kernel'):  # kaiming normal, fan_out
            kh, kw, _, out = leaf.shape
            assert leaf.std() == pytest.approx(math.sqrt(2 / (kh * kw * out)), rel=0.2), path
        elif path.endswith('bn3/scale'):  # zero_init_last
            assert not leaf.any(), path
        else:
            assert (leaf == (1 if path.endswith('scale') else 0)).all(), path
    for path, leaf in _flat(caformer_training[2]['backbone']).items():
        if path.endswith('kernel') and leaf.size > 500:  # trunc_normal_(std=0.02)
            assert leaf.std() == pytest.approx(0.02, rel=0.1), path
        elif not path.endswith('kernel'):
            assert (leaf == (1 if path.endswith('scale') else 0)).all(), path


def test_resnet_batch_norm_is_global_and_teacher_keeps_its_own_stats(resnet_training):
    """The 4-device step's BN statistics equal a 1-device forward's (so they are over the
    global batch); the teacher's come from its own forward pass, never from the
    student's (the official EMA skips buffers); the loss keeps changing."""
    config, training, _ = resnet_training
    mesh = training.state.step.sharding.mesh
    batch = _batch(config, 0)
    crops = [batch['global'], batch['local']]
    # Jitted on unsharded inputs, this runs on one device.
    forward_statistics = jax.jit(lambda params, stats, crops: training.network.apply(
        {'params': params, 'batch_stats': stats}, crops, train=True,
        mutable=['batch_stats'])[1]['batch_stats'])
    state, losses = training.state, []
    for step in range(3):
        # Copies: the step donates the state.
        student_before = jax.device_get((state.params, state.batch_stats))
        teacher_before = jax.device_get((state.teacher_params, state.teacher_batch_stats))
        state, metrics = training.train_step(state, _place(batch, mesh))
        losses.append(float(metrics['loss']))
        for before, after in ((student_before, state.batch_stats),
                              (teacher_before, state.teacher_batch_stats)):
            expected = _flat(forward_statistics(*before, crops))
            for path, leaf in _flat(after).items():
                np.testing.assert_allclose(leaf, expected[path], rtol=2e-5, atol=1e-6,
                                           err_msg=path)
    # The same forward with the batch sharded over the 4 devices: the same statistics.
    sharded = _flat(forward_statistics(*teacher_before, _place(crops, mesh)))
    for path, leaf in _flat(state.teacher_batch_stats).items():
        np.testing.assert_allclose(sharded[path], leaf, rtol=2e-5, atol=1e-6, err_msg=path)
    assert np.isfinite(losses).all() and len(set(losses)) == 3, losses
    student, teacher = _flat(state.batch_stats), _flat(state.teacher_batch_stats)
    assert any(not np.allclose(student[path], teacher[path]) for path in student)


def test_caformer_trains_on_four_devices(caformer_training):
    config, training, initial = caformer_training
    mesh = training.state.step.sharding.mesh
    state, losses = training.state, []
    for step in range(3):
        state, metrics = training.train_step(state, _place(_batch(config, 0), mesh))
        assert all(np.isfinite(np.asarray(value)).all() for value in metrics.values())
        losses.append(float(metrics['loss']))
    assert len(set(losses)) == 3, losses
    final, initial = _flat(state.params), _flat(initial)
    assert all(not np.array_equal(final[path], initial[path]) for path in initial)


# ---------------------------------------------------------------------------- conversion


def test_timm_model_kwargs():
    assert resnet.timm_model_kwargs({'name': 'resnet50'}) == {
        'model_name': 'resnet50', 'num_classes': 0}
    assert resnet.timm_model_kwargs(TINY_RESNET) == {
        'model_name': 'resnet50', 'num_classes': 0, 'layers': (1, 1, 1, 1),
        'channels': (8, 16, 32, 64)}
    assert caformer.timm_model_kwargs({'name': 'caformer_m36', 'remat': True}) == {
        'model_name': 'caformer_m36', 'num_classes': 0, 'mlp_act': 'gelu',
        'act1_layer': 'gelu', 'res_scale_init_values': (None, None, None, None)}
    # timm registers no CAFormer of other shapes: its MetaFormer class, as caformer_*.
    assert caformer.timm_model_kwargs(TINY_CAFORMER) == {
        'model_class': 'MetaFormer', 'depths': (1, 1, 1, 1), 'dims': (8, 16, 32, 64),
        'token_mixers': ('SepConv', 'SepConv', 'Attention', 'Attention'),
        'norm_layers': ('LayerNorm2dNoBias',) * 2 + ('LayerNormNoBias',) * 2,
        'num_classes': 0, 'mlp_act': 'gelu', 'act1_layer': 'gelu',
        'res_scale_init_values': (None, None, None, None)}
    with pytest.raises(ValueError, match='head_dim 32, got 16'):
        caformer.timm_model_kwargs({**TINY_CAFORMER, 'head_dim': 16})


def test_conversion_round_trip_and_named_errors():
    variables = _random_variables(ResNet(**TINY_RESNET))
    state_dict = resnet.to_timm(variables['params'], variables['batch_stats'])
    assert state_dict['conv1.weight'].shape == (64, 3, 7, 7)
    assert state_dict['layer2.0.downsample.0.weight'].shape == (64, 32, 1, 1)
    assert state_dict['layer1.0.bn3.num_batches_tracked'].dtype == np.int64
    params, batch_stats = resnet.from_timm(state_dict)
    for got, want in ((params, variables['params']),
                      (batch_stats, variables['batch_stats'])):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"has no 'layer1.0.conv2.weight', which"):
        resnet.from_timm({k: v for k, v in state_dict.items()
                          if k != 'layer1.0.conv2.weight'})
    with pytest.raises(ValueError, match=r"'layer1.0.conv2.weight' has shape "
                                         r"\(8, 8, 1, 1\), the requested backbone "
                                         r"expects \(8, 8, 3, 3\)"):
        resnet.from_timm({**state_dict, 'layer1.0.conv2.weight': np.zeros((8, 8, 1, 1))})
    with pytest.raises(ValueError, match="Not a timm ResNet"):
        resnet.from_timm({'stem.conv.weight': np.zeros(1)})

    state_dict = caformer.to_timm(_random_variables(CAFormer(**TINY_CAFORMER))['params'])
    assert state_dict['stages.0.blocks.0.token_mixer.dwconv.weight'].shape == (16, 1, 7, 7)
    assert state_dict['stages.2.blocks.0.mlp.fc1.weight'].shape == (128, 32)
    assert state_dict['stages.1.blocks.0.mlp.fc1.weight'].shape == (64, 16, 1, 1)
    # timm's default caformer (StarReLU, res-scale) has keys the official one does not.
    with pytest.raises(ValueError, match=r"has 1 keys the requested backbone does "
                                         r"not: 'stages.2.blocks.0.res_scale1.scale'"):
        caformer.from_timm({**state_dict, 'stages.2.blocks.0.res_scale1.scale': np.ones(32)})


# ------------------------------------------------------------------------ timm parity

_TIMM_SCRIPT = r'''
import json, sys
import numpy as np
import torch
import timm
from timm.layers import get_act_layer
from timm.models import metaformer

torch.set_num_threads(2)


def build(job, **extra):
    kwargs = dict(job['kwargs'], **extra)
    for key in ('mlp_act', 'act1_layer'):
        if key in kwargs:
            kwargs[key] = get_act_layer(kwargs[key])
    return timm.create_model(**kwargs)


def perturb(model, generator):
    """Non-trivial norm weights and biases (timm's init has bn3 = 0, biases 0), then BN
    running statistics of real activations: the average over two random batches.

    Residual branches stay small (bn3 weights 0.1-0.3), as after zero_init_last: with
    unit-size branches this random ResNet-50 amplifies rounding so much that torch's own
    fp32 and fp64 features differ by 1.6e-4; with these, by 6e-6."""
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tensor.ndim == 1 and name.endswith('weight'):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.8 + 0.4)
                if name.endswith('bn3.weight'):
                    tensor.mul_(0.25)
            elif tensor.ndim == 1:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for batch_norm in batch_norms:
            batch_norm.reset_running_stats()
            batch_norm.momentum = None  # cumulative average
        model.train()
        for _ in range(2 if batch_norms else 0):
            model(torch.randn(8, 3, 64, 64, generator=generator))
        for batch_norm in batch_norms:
            batch_norm.momentum = 0.1


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def run(job):
    torch.manual_seed(job['seed'])
    if job.get('state_dict'):  # no init: every tensor comes from the file
        model = build(job, device='meta')
        loaded = np.load(job['state_dict'])
        model.load_state_dict({k: torch.from_numpy(loaded[k]) for k in loaded},
                              strict=True, assign=True)
    else:
        model = build(job)
        perturb(model, torch.Generator().manual_seed(job['seed']))
        np.savez(job['out'] + '.state.npz', **numpy_state(model))
    images = torch.from_numpy(np.load(job['images'])).permute(0, 3, 1, 2).contiguous()
    outputs = {}
    if job.get('attention'):
        captured = {}
        mixer = model.stages[-1].blocks[-1].token_mixer
        mixer.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    model.eval()
    with torch.no_grad():
        outputs['eval'] = model(images).numpy()
        if job.get('attention'):
            x = captured['x']
            qkv = mixer.qkv(x).reshape(x.shape[0], x.shape[1], 3, mixer.num_heads,
                                       mixer.head_dim).permute(2, 0, 3, 1, 4)
            logits = (qkv[0] @ qkv[1].transpose(-2, -1)) * mixer.scale
            outputs['attention'] = logits.softmax(-1).numpy()
        if job.get('train'):
            model.train()
            outputs['train'] = model(images).numpy()
            np.savez(job['out'] + '.state_after_train.npz', **numpy_state(model))
    np.savez(job['out'] + '.npz', **outputs)


# One process for both rounds (importing torch is slow): a job file per stdin line.
for line in sys.stdin:
    for job in json.load(open(line.strip())):
        run(job)
    print('done', flush=True)
'''


def _run_timm(process, jobs, directory: pathlib.Path):
    spec = directory / f'jobs_{len(list(directory.glob("jobs_*")))}.json'
    spec.write_text(json.dumps(jobs))
    process.stdin.write(f'{spec}\n')
    process.stdin.flush()
    if process.stdout.readline().strip() != 'done':
        raise RuntimeError(f'the timm subprocess failed on {spec} (its stderr is above)')
    return {job['name']: {name: dict(np.load(job['out'] + suffix)) for name, suffix in
                          (('outputs', '.npz'), ('state', '.state.npz'),
                           ('after_train', '.state_after_train.npz'))
                          if pathlib.Path(job['out'] + suffix).exists()}
            for job in jobs}


PARITY_CASES = {
    # name: (module, model attributes, images, train-mode check, attention check)
    'resnet50': (resnet, {}, (2, 64, 64, 3), False, False),
    'resnet_tiny': (resnet, TINY_RESNET, (4, 64, 64, 3), True, False),
    'caformer_m36': (caformer, {}, (2, 64, 64, 3), False, True),
}


@pytest.fixture(scope='module')
def timm_runs(tmp_path_factory):
    """timm builds and perturbs each model (run 1); JAX loads it with `from_timm`;
    `to_timm` of that is loaded back into a fresh timm model with strict=True (run 2)."""
    # Not `importorskip`: importing timm here, after TensorFlow, would crash the process.
    if importlib.util.find_spec('timm') is None:
        pytest.skip('timm is not installed (requirements-test.txt)')
    directory = tmp_path_factory.mktemp('timm')
    jobs = []
    for seed, (name, (module, model, shape, train, attention)) in enumerate(
            PARITY_CASES.items()):
        np.save(directory / f'{name}_images.npy', _images(shape, seed))
        jobs.append(dict(name=name, seed=seed, kwargs=module.timm_model_kwargs(model),
                         images=str(directory / f'{name}_images.npy'), train=train,
                         attention=attention, out=str(directory / name)))
    with subprocess.Popen([sys.executable, '-c', _TIMM_SCRIPT], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as process:
        first = _run_timm(process, jobs, directory)
        converted = {name: PARITY_CASES[name][0].from_timm(first[name]['state'])
                     for name in PARITY_CASES}
        for job in jobs:
            params, batch_stats = converted[job['name']]
            state_dict = PARITY_CASES[job['name']][0].to_timm(params, batch_stats)
            np.savez(directory / f'{job["name"]}_jax.npz', **state_dict)
            job.update(state_dict=str(directory / f'{job["name"]}_jax.npz'),
                       out=job['out'] + '_reloaded', train=False)
        second = _run_timm(process, jobs, directory)
        process.stdin.close()
    return first, converted, second


@pytest.mark.parametrize('name', PARITY_CASES)
def test_timm_parity(timm_runs, name):
    first, converted, second = timm_runs
    module, attributes, shape, train, attention = PARITY_CASES[name]
    model = ResNet(**attributes) if module is resnet else CAFormer(**attributes)
    params, batch_stats = converted[name]
    variables = {'params': params, 'batch_stats': batch_stats} if batch_stats else {
        'params': params}
    images = _images(shape, list(PARITY_CASES).index(name))
    reference = first[name]['outputs']
    # The exported state dict loads strictly into timm and gives the same features.
    np.testing.assert_allclose(second[name]['outputs']['eval'], reference['eval'],
                               atol=1e-6, rtol=0)
    if module is caformer:
        features = jax.jit(lambda v, x: model.apply(v, x, return_attention=True,
                                                    method=model.encode))(variables, images)
        np.testing.assert_allclose(features['pooled'], reference['eval'],
                                   atol=PARITY_TOLERANCE, rtol=0)
        np.testing.assert_allclose(features['attention'], reference['attention'],
                                   atol=1e-5, rtol=0)
        batch, heads, tokens, _ = reference['attention'].shape
        side = math.isqrt(tokens)
        np.testing.assert_allclose(features['attention_map'],
                                   reference['attention'].mean(2).reshape(
                                       batch, heads, side, side), atol=1e-5, rtol=0)
        return
    features = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    assert np.abs(reference['eval']).max() > 0.1  # not a trivially small output
    np.testing.assert_allclose(features, reference['eval'], atol=PARITY_TOLERANCE, rtol=0)
    if train:
        features, updates = jax.jit(lambda v, x: model.apply(
            v, x, train=True, mutable=['batch_stats']))(variables, images)
        np.testing.assert_allclose(features, reference['train'], atol=PARITY_TOLERANCE,
                                   rtol=0)
        after = first[name]['after_train']
        for key, value in resnet.to_timm(params, updates['batch_stats']).items():
            if 'running' in key:
                np.testing.assert_allclose(value, after[key], rtol=1e-5, atol=1e-6,
                                           err_msg=key)
