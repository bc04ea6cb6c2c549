"""Export to timm and import of PyTorch checkpoints: parity with real timm, round trips,
the head-count trap, and the command's errors.

timm runs in a child process that never imports TensorFlow, which other tests may
already have imported into this one (torch after TensorFlow segfaults).
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from bam_jax import export
from bam_jax import train as train_lib
from bam_jax.models.multicrop import build_network
from bam_jax.models import torch_layout
from bam_jax.models.timm_names import ArchitectureMismatch, timm_backbone
from bam_jax.models.vit import vit
from bam_jax.train.checkpoint import Checkpointer
from conftest import changed_copy, corrupt_checkpoint, data_mesh, timm_child
from configs import caformer_m36_imagenet, resnet50_imagenet
from test_backbones import TINY_CAFORMER, TINY_RESNET, tiny_backbone_config
from test_train import leaves_with_paths, place, random_batch, tiny_config

# One test worker runs this module, so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group('export')

TOLERANCE = 1e-4  # max |JAX - timm| in float32, CLS features and patch tokens
TRAINED_STEP = 3
REPOSITORY = pathlib.Path(__file__).parent.parent

# Loads each job's model by executing its lines (the lines the exporter prints), then
# records the CLS features and the normed last-block tokens at each image size.
TIMM_FEATURES = r'''
import json, sys
import numpy as np
import torch

def official_load(model, path, take_teacher):
    """The official `utils.load_pretrained_weights`, returning torch's key report."""
    state_dict = torch.load(path, map_location='cpu', weights_only=True)['model']
    for prefix in ('module.', 'backbone.', '_orig_mod.', 'base_encoder.'):
        state_dict = {key.replace(prefix, ''): value for key, value in state_dict.items()}
    network = 'teacher.' if take_teacher else 'student.'
    state_dict = {key.replace(network, ''): value for key, value in state_dict.items()}
    return model.load_state_dict(state_dict, strict=False)

jobs_path, images_path, out_path = sys.argv[1:4]
images = np.load(images_path)
features, reports = {}, {}
for job in json.load(open(jobs_path)):
    namespace = {'official_load': official_load}
    exec('\n'.join(job['lines']), namespace)
    model = namespace['model'].eval()
    if 'report' in namespace:
        reports[job['name']] = {'missing': namespace['report'].missing_keys,
                                'unexpected': namespace['report'].unexpected_keys}
    for size in job['sizes']:
        images_nchw = torch.from_numpy(images[size]).permute(0, 3, 1, 2)
        with torch.no_grad():
            features[f'{job["name"]}/{size}/tokens'] = model.forward_features(images_nchw)
            features[f'{job["name"]}/{size}/cls'] = model(images_nchw)
np.savez(out_path, **{key: value.numpy() for key, value in features.items()})
json.dump({'reports': reports, 'tensorflow_imported': 'tensorflow' in sys.modules},
          open(out_path + '.json', 'w'))
'''


def timm_features(jobs, images, scratch: pathlib.Path):
    """{job/size/cls|tokens: array} and {job: key report} from real timm."""
    features, report = timm_child(TIMM_FEATURES, jobs, images, scratch)
    return features, report['reports']


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return {f'{height}x{width}': rng.normal(size=(2, height, width, 3)).astype(np.float32)
            for height, width in sizes}


def feature_function(backbone):
    """params, images → {size: (cls, normed last-block tokens)} of the JAX backbone."""
    encode = jax.jit(lambda params, batch: backbone.apply({'params': params}, batch,
                                                          method='encode'))

    def features(params, images):
        encoded = {size: encode(params, batch) for size, batch in images.items()}
        return {size: (np.asarray(output['cls']), np.asarray(output['blocks'][-1]))
                for size, output in encoded.items()}
    return features


def max_differences(expected, timm, job):
    """Largest |JAX - timm| of the CLS features and of the patch tokens, over sizes."""
    cls = max(np.abs(timm[f'{job}/{size}/cls'] - want_cls).max()
              for size, (want_cls, _) in expected.items())
    tokens = max(np.abs(timm[f'{job}/{size}/tokens'][:, 1:] - want_tokens[:, 1:]).max()
                 for size, (_, want_tokens) in expected.items())
    return float(cls), float(tokens)


def backbone_params(state, weights):
    return jax.device_get((state.teacher_params if weights == 'teacher'
                           else state.params)['backbone'])


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A tiny run's workdir, written on 8 devices: step 0 (random) and step 3 (trained).

    Global crops only: the step compiles in half the time, and 8 px inputs are tested
    at export anyway.
    """
    config = tiny_config()
    config.crops.n_local = 0
    mesh = data_mesh(8)
    training = train_lib.build_training(config, mesh, steps_per_epoch=5)
    workdir = tmp_path_factory.mktemp('run')
    (workdir / 'config.json').write_text(config.to_json_best_effort())
    checkpointer = Checkpointer(workdir / 'checkpoints', json_items=('config',))
    states = {0: jax.tree.map(jnp.copy, training.state)}  # the step donates its input
    state = training.state
    for step in range(TRAINED_STEP):
        state, _ = training.train_step(state, place(random_batch(config, step), mesh))
    states[TRAINED_STEP] = state
    for step, saved in states.items():
        checkpointer.save(step, saved, config=config.to_dict())
    checkpointer.wait_until_finished()
    checkpointer.close()
    return config, workdir, jax.device_get(states)


@pytest.fixture(scope='module')
def exports(tiny_run, tmp_path_factory):
    """The trained step by the real command (teacher + official file); step 0 in-process."""
    _, workdir, _ = tiny_run
    out = tmp_path_factory.mktemp('exports')
    command = subprocess.run(  # a relative --workdir, as typed (orbax wants absolute)
        [sys.executable, '-m', 'bam_jax.export', '--workdir', workdir.name,
         '--out', str(out / 'trained.safetensors'), '--official'],
        capture_output=True, text=True, cwd=workdir.parent, check=False,
        env=dict(os.environ, PYTHONPATH=str(REPOSITORY)))
    assert command.returncode == 0, command.stderr
    random_init = export.export_workdir(workdir, out / 'random.pth', step=0,
                                        weights='student')
    return out, command.stdout, random_init


def test_exports_match_timm_before_and_after_training(tiny_run, exports, tmp_path):
    config, _, states = tiny_run
    out, stdout, random_init = exports
    trained = json.loads((out / 'trained.json').read_text())
    # The command prints exactly the lines the JSON records, and they are what runs.
    assert trained['load'] == [line.strip() for line in stdout.splitlines()[-4:]]
    assert (trained['step'], trained['weights']) == (TRAINED_STEP, 'teacher')
    assert (random_init['step'], random_init['format']) == (0, 'pth')

    # img_size, a local-crop-like downsample (antialiased), a non-square upsample.
    images = random_images([(16, 16), (8, 8), (28, 20)])
    create_line = trained['load'][:3]
    official = str(out / 'trained.official.pth')
    jobs = [
        dict(name='trained_teacher', lines=trained['load'], sizes=list(images)),
        dict(name='random_student', lines=random_init['load'], sizes=list(images)),
        dict(name='official_teacher', sizes=list(images), lines=create_line + [
            f'report = official_load(model, {official!r}, take_teacher=True)']),
        dict(name='official_student', sizes=list(images), lines=create_line + [
            f'report = official_load(model, {official!r}, take_teacher=False)']),
    ]
    timm, reports = timm_features(jobs, images, tmp_path)

    jax_features = feature_function(build_network(config).backbone)
    expected = {
        'trained_teacher': (TRAINED_STEP, 'teacher'), 'random_student': (0, 'student'),
        'official_teacher': (TRAINED_STEP, 'teacher'),
        'official_student': (TRAINED_STEP, 'student'),
    }
    for job, (step, weights) in expected.items():
        features = jax_features(backbone_params(states[step], weights), images)
        cls, tokens = max_differences(features, timm, job)
        assert cls <= TOLERANCE and tokens <= TOLERANCE, (job, cls, tokens)
    # The official loader finds every key; only the other network's are left over.
    for job, other in (('official_teacher', 'student.'), ('official_student', 'teacher.')):
        assert reports[job]['missing'] == []
        assert reports[job]['unexpected'] and all(
            key.startswith(other) for key in reports[job]['unexpected'])
    # Training moved the weights, so "trained" and "random" are different models.
    qkv_kernels = [backbone_params(states[step], 'student')['blocks_0']['attn']['qkv']
                   ['kernel'] for step in (0, TRAINED_STEP)]
    assert not np.allclose(*qkv_kernels)


def test_vit_small_matches_timm_only_with_twelve_heads(tmp_path):
    model_config = dict(name='vit', variant='small', patch_size=16, img_size=224)
    backbone = vit('small')
    # Random weights drawn in NumPy (faster than `init`), none zero or one, so that no
    # zero bias or unit LayerNorm scale hides a wrong mapping.
    shapes = jax.eval_shape(backbone.init, jax.random.key(0),
                            jnp.zeros((1, 224, 224, 3)))['params']
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: ((path[-1].key == 'scale') + 0.05 * rng.normal(
            size=leaf.shape)).astype(np.float32), shapes)
    summary = export.export_backbone({'params': params}, model_config,
                                     tmp_path / 'vits16.safetensors')
    recorded = json.loads((tmp_path / 'vits16.json').read_text())
    assert recorded['model_kwargs']['num_heads'] == 12
    assert recorded['model_name'] == 'vit_small_patch16_224'  # whose default is 6 heads

    six_heads = {**summary, 'model_kwargs': {**summary['model_kwargs'], 'num_heads': 6}}
    images = random_images([(224, 224), (96, 96)])
    jobs = [dict(name='exported', lines=summary['load'], sizes=list(images)),
            dict(name='six_heads', sizes=['224x224'], lines=export.load_lines(
                six_heads, tmp_path / 'vits16.safetensors', 'safetensors'))]
    timm, _ = timm_features(jobs, images, tmp_path)
    features = feature_function(backbone)(params, images)
    cls, tokens = max_differences(features, timm, 'exported')
    assert cls <= TOLERANCE and tokens <= TOLERANCE, (cls, tokens)
    # Six heads load with strict=True (same shapes) but compute something else.
    wrong_cls, _ = max_differences({'224x224': features['224x224']}, timm, 'six_heads')
    assert wrong_cls > 1e-2


def test_round_trip_gives_identical_params(tiny_run, exports):
    config, _, states = tiny_run
    out, _, _ = exports
    trained, random_init = states[TRAINED_STEP], states[0]
    cases = [  # (the official file's student: in the next test)
        ('trained.safetensors', None, backbone_params(trained, 'teacher')),
        ('random.pth', None, backbone_params(random_init, 'student')),
        ('trained.official.pth', None, backbone_params(trained, 'teacher')),
    ]
    for name, weights, expected in cases:
        imported = export.import_backbone(out / name, config, weights=weights)
        assert set(imported) == {'params'}
        got, want = leaves_with_paths(imported['params']), leaves_with_paths(expected)
        assert got.keys() == want.keys()
        for path, leaf in want.items():
            np.testing.assert_array_equal(got[path], leaf, err_msg=f'{name} {path}')
            assert got[path].dtype == leaf.dtype


# Adds what a real official `checkpoint.pth` also holds: heads, optimizer, epoch,
# ContrastiveCrop boxes, the fp16 scaler and the run's argparse `args`.
MAKE_OFFICIAL = r'''
import argparse, sys
import torch
source, target, arch = sys.argv[1:4]
model = torch.load(source, map_location='cpu', weights_only=True)['model']
for network in ('student.module.', 'teacher.'):
    model[network + 'proj_head.projector.0.weight'] = torch.zeros(64, 32)
torch.save({'model': model, 'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]},
            'epoch': 3, 'boxes': torch.zeros(10, 4), 'fp16_scaler': None,
            'args': argparse.Namespace(arch=arch, patch_size=4, lr=0.0048, epochs=10)},
           target)
'''


def test_import_official_checkpoint_and_refuse_other_architectures(tiny_run, exports,
                                                                   tmp_path):
    config, _, states = tiny_run
    out, _, _ = exports
    official = tmp_path / 'checkpoint.pth'
    subprocess.run([sys.executable, '-c', MAKE_OFFICIAL, str(out / 'trained.official.pth'),
                    str(official), 'vit_tiny'], check=True)
    imported = export.import_backbone(official, config, weights='student')
    for path, leaf in leaves_with_paths(backbone_params(states[TRAINED_STEP],
                                                        'student')).items():
        np.testing.assert_array_equal(leaves_with_paths(imported['params'])[path], leaf)

    # Same shapes (the tiny overrides), but the file's run was `--arch vit_tiny`.
    small = tiny_config()
    small.model.variant = 'small'
    with pytest.raises(ArchitectureMismatch,
                       match=r"arch='vit_tiny' \(requested 'vit_small'\)"):
        export.import_backbone(official, small)
    wider = tiny_config()
    wider.model.embed_dim = 64
    shutil.copy(out / 'trained.safetensors', tmp_path / 'no_json.safetensors')
    with pytest.raises(ArchitectureMismatch,
                       match=r"'blocks.0.attn.proj.bias' has shape \(32,\), the requested "
                             r"backbone expects \(64,\)"):
        export.import_backbone(tmp_path / 'no_json.safetensors', wider)
    # Same shapes, other head count: caught from the exported file's JSON.
    more_heads = tiny_config()
    more_heads.model.num_heads = 4
    with pytest.raises(ArchitectureMismatch, match=r'num_heads=2 \(requested 4\)'):
        export.import_backbone(out / 'trained.safetensors', more_heads)
    with pytest.raises(export.ExportError, match='is not a readable PyTorch checkpoint'):
        (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
        export.import_backbone(tmp_path / 'garbage.pth', config)


def _edit_config(workdir, **model):
    config = json.loads((workdir / 'config.json').read_text())
    config['model'].update(model)
    (workdir / 'config.json').write_text(json.dumps(config))


def _corrupt(workdir):
    corrupt_checkpoint(workdir, TRAINED_STEP)


@pytest.mark.parametrize('case, change, arguments, message', [
    ('missing workdir', shutil.rmtree, [], r'workdir .*run does not exist'),
    ('not a workdir', lambda workdir: (workdir / 'config.json').unlink(), [],
     r'config.json not found'),
    ('missing step', None, ['--step', '7'],
     r'no checkpoint for step 7 .*available steps: \[0, 3\]'),
    ('corrupt', _corrupt, ['--official'], r'checkpoints/3 is corrupt or unreadable: '),
    ('wider config', lambda workdir: _edit_config(workdir, embed_dim=64), [],
     r'does not match the model of .*config.json: params.backbone.\S+ has shape \(32,\) '
     r'in the checkpoint but \(64,\) for the config'),
    ('other head count', lambda workdir: _edit_config(workdir, num_heads=4), [],
     r"config.json says model .*'num_heads': 4.* was saved with model .*'num_heads': 2"),
    ('format clash', None, ['--format', 'pth'],
     r'has a .safetensors suffix but --format is pth'),
])
def test_command_errors_are_one_line_and_leave_no_file(tiny_run, tmp_path, capsys, case,
                                                       change, arguments, message):
    _, run_workdir, _ = tiny_run
    workdir, out = changed_copy(run_workdir, tmp_path, change)
    argv = ['--workdir', str(workdir), '--out', str(out / 'model.safetensors')]
    argv += arguments
    assert export.main(argv) == 1
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith('error: '), stderr
    assert re.search(message, stderr[0]), stderr[0]
    assert list(out.iterdir()) == []


@pytest.mark.parametrize('existing', ['model.safetensors', 'model.json'])
def test_existing_output_is_refused_without_overwrite(tiny_run, tmp_path, capsys, existing):
    _, workdir, _ = tiny_run
    (tmp_path / existing).write_bytes(b'an earlier export')
    argv = ['--workdir', str(workdir), '--out', str(tmp_path / 'model.safetensors')]
    assert export.main(argv) == 1
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr == [f'error: {tmp_path / existing} exists; pass --overwrite to replace '
                      'it, or choose another --out']
    assert [path.name for path in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_bytes() == b'an earlier export'
    assert export.main([*argv, '--overwrite']) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ['model.json',
                                                                 'model.safetensors']
    assert json.loads((tmp_path / 'model.json').read_text())['step'] == TRAINED_STEP


# ------------------------------------------------------------ the torch child

# .pth files the exporter never writes: an official-style bfloat16 checkpoint with
# `args`, and two that are not state dicts.
MAKE_TORCH_FILES = r'''
import argparse, sys, torch
directory = sys.argv[1]
weights = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) / 4
args = argparse.Namespace(arch='vit_small', patch_size=16, lr=0.1, drop=[0.1, 0.2])
torch.save({'state_dict': {'w': weights, 'epoch': 3}, 'args': args}, f'{directory}/bf16.pth')
torch.save([torch.zeros(2)], f'{directory}/list.pth')
torch.save({'model': {'epoch': 3}}, f'{directory}/no_tensors.pth')
'''


def torch_child(*arguments):
    """`python -X importtime -m bam_jax.export_torch ARGUMENTS`: (result, modules imported)."""
    result = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'bam_jax.export_torch',
                             *map(str, arguments)],
                            cwd=REPOSITORY, capture_output=True, text=True, check=False)
    lines = result.stderr.splitlines()
    imported = {line.rsplit('|', 1)[-1].strip() for line in lines
                if line.startswith('import time:')}
    errors = [line for line in lines if not line.startswith('import time:')]
    return result.returncode, result.stdout, errors, imported


def test_torch_child_reads_official_checkpoints_and_refuses_other_files(tmp_path):
    subprocess.run([sys.executable, '-c', MAKE_TORCH_FILES, tmp_path], check=True)
    code, stdout, errors, imported = torch_child('load', tmp_path / 'bf16.pth',
                                                 tmp_path / 'bf16.safetensors')
    assert code == 0, errors
    assert 'torch' in imported and not {'jax', 'tensorflow', 'flax'} & imported
    # The run's simple args (its architecture), not the list.
    assert json.loads(stdout) == {'args': {'arch': 'vit_small', 'patch_size': 16, 'lr': 0.1}}
    tensors = load_file(tmp_path / 'bf16.safetensors')
    assert list(tensors) == ['w'] and tensors['w'].dtype == np.float32  # bfloat16 widened
    np.testing.assert_array_equal(tensors['w'], np.arange(6).reshape(2, 3) / 4)
    for name, message in [('list.pth', 'holds a list, not a state dict'),
                          ('no_tensors.pth', 'holds no tensors')]:
        code, _, errors, _ = torch_child('load', tmp_path / name, tmp_path / 'x.safetensors')
        assert (code, errors) == (1, [f'{tmp_path / name} {message}'])
        assert not (tmp_path / 'x.safetensors').exists()


# ------------------------------------------------------------ ResNet and CAFormer

BACKBONE_RUNS = {  # name: (config module, tiny `config.model` attributes)
    'resnet50': (resnet50_imagenet, TINY_RESNET),
    'caformer_m36': (caformer_m36_imagenet, TINY_CAFORMER),
}


def _perturbed(tree, rng):
    """Random norm weights and biases (0.4-1.2, ±0.1) and BN statistics (mean ±0.1,
    var 0.5-1.5) in place of init's ones and zeros, which would hide a swapped or
    misnamed leaf; conv and dense kernels keep their init."""
    def perturb(path, leaf):
        name = path[-1].key
        if leaf.ndim != 1 or name not in ('scale', 'bias', 'mean', 'var'):
            return leaf
        if name in ('scale', 'var'):
            low, high = (0.4, 1.2) if name == 'scale' else (0.5, 1.5)
            values = rng.uniform(low, high, leaf.shape)
        else:
            values = rng.normal(scale=0.1, size=leaf.shape)
        return jax.device_put(values.astype(np.float32), leaf.sharding)
    return jax.tree_util.tree_map_with_path(perturb, tree)


@pytest.fixture(scope='module')
def backbone_exports(tmp_path_factory):
    """For a tiny ResNet and CAFormer: a workdir (step 0, teacher perturbed) exported by
    the real command. Returns {name: (config, teacher variables, stdout, summary)}."""
    runs = {}
    rng = np.random.default_rng(0)
    for name, (config_module, model) in BACKBONE_RUNS.items():
        config = tiny_backbone_config(config_module, model)
        # The 'rbg' generator compiles the init twice as fast here; the state's own key
        # is then swapped for the default kind, which the exporter's abstract state has.
        training = train_lib.build_training(config, data_mesh(2), steps_per_epoch=5,
                                            rng=jax.random.key(0, impl='rbg'))
        state = training.state.replace(
            teacher_params=_perturbed(training.state.teacher_params, rng),
            teacher_batch_stats=_perturbed(training.state.teacher_batch_stats, rng),
            rng=jax.device_put(jax.random.PRNGKey(0), training.state.step.sharding))
        workdir = tmp_path_factory.mktemp(name)
        (workdir / 'config.json').write_text(config.to_json_best_effort())
        checkpointer = Checkpointer(workdir / 'checkpoints', json_items=('config',))
        checkpointer.save(0, state, config=config.to_dict())
        checkpointer.wait_until_finished()
        checkpointer.close()
        out = workdir / f'{name}.safetensors'
        command = subprocess.run(
            [sys.executable, '-m', 'bam_jax.export', '--workdir', str(workdir),
             '--out', str(out)], capture_output=True, text=True, cwd=REPOSITORY,
            check=False)
        assert command.returncode == 0, command.stderr
        runs[name] = (config, export.backbone_variables(jax.device_get(state), 'teacher'),
                      command.stdout, json.loads(out.with_suffix('.json').read_text()))
    return runs


def test_resnet_and_caformer_exports_match_timm(backbone_exports, tmp_path):
    """The printed lines, run as they are, load the files into real timm strictly, and
    timm's pooled features equal the JAX backbone's."""
    images = random_images([(64, 64), (40, 48)])
    jobs = []
    for name, (_, _, stdout, summary) in backbone_exports.items():
        assert summary['load'] == [line.strip() for line in stdout.splitlines()[-4:]]
        jobs.append(dict(name=name, lines=summary['load'], sizes=list(images)))
    resnet_lines, caformer_lines = (backbone_exports[name][3]['load'] for name in
                                    BACKBONE_RUNS)
    assert "model = timm.create_model('resnet50', num_classes=0, layers=[1, 1, 1, 1], " \
        "channels=[8, 16, 32, 64])" in resnet_lines
    # timm registers caformer_m36 only at M36's shapes: the tiny one is its MetaFormer.
    assert caformer_lines[2].startswith('model = timm.models.metaformer.MetaFormer(')
    assert "mlp_act=timm.layers.get_act_layer('gelu')" in caformer_lines[2]
    timm, _ = timm_features(jobs, images, tmp_path)
    for name, (config, variables, _, _) in backbone_exports.items():
        backbone = build_network(config).backbone
        for size, batch in images.items():
            features = np.asarray(jax.jit(backbone.apply)(variables, batch))
            assert np.abs(features).max() > 0.1, (name, size)
            difference = np.abs(timm[f'{name}/{size}/cls'] - features).max()
            assert difference <= TOLERANCE, (name, size, difference)


def test_resnet_and_caformer_round_trip(backbone_exports):
    """JAX → export → import gives identical params, and the ResNet's BN statistics."""
    for name, (config, variables, _, summary) in backbone_exports.items():
        imported = export.import_backbone(summary['file'], config)
        assert set(imported) == set(variables), name
        got, want = leaves_with_paths(imported), leaves_with_paths(variables)
        assert got.keys() == want.keys()
        for path, leaf in want.items():
            np.testing.assert_array_equal(got[path], leaf, err_msg=f'{name} {path}')
    state_dict = load_file(backbone_exports['resnet50'][3]['file'])
    assert state_dict['layer1.0.bn3.num_batches_tracked'].dtype == np.int64
    np.testing.assert_array_equal(
        state_dict['layer1.0.bn3.running_var'],
        backbone_exports['resnet50'][1]['batch_stats']['layer1_0']['bn3']['var'])


def test_failed_write_leaves_no_file(tmp_path):
    good = tmp_path / 'good.safetensors'
    bad = tmp_path / 'bad.safetensors'
    with pytest.raises(Exception):
        export.write_all({
            good: lambda path: export.save_state_dict({'x': np.zeros(2)}, path,
                                                      'safetensors'),
            bad: lambda path: export.save_state_dict({'x': np.array([object()])}, path,
                                                     'safetensors'),
        })
    assert list(tmp_path.iterdir()) == []


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match=r"no timm conversion for config.model.name "
                                         r"'resnet'; known: \['caformer_m36', "
                                         r"'resnet50', 'vit'\]"):
        timm_backbone('resnet')


class ConvBatchNormDense(nn.Module):
    """The leaf kinds a ResNet adds to the ViT's: conv without bias, BatchNorm."""

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(8, (3, 3), use_bias=False, name='conv1')(images)
        x = nn.BatchNorm(use_running_average=True, name='bn1')(x)
        return nn.Dense(10, name='fc')(x.mean(axis=(1, 2)))


def test_generic_conversion_of_batch_norm_backbones():
    """torch's keys and shapes: Conv2d(3, 8, 3, bias=False), BatchNorm2d(8), Linear(8, 10)."""
    abstract = jax.eval_shape(ConvBatchNormDense().init, jax.random.key(0),
                              jnp.zeros((1, 6, 6, 3)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32),
                             abstract)
    state_dict = torch_layout.to_state_dict(variables)
    assert {key: value.shape for key, value in state_dict.items()} == {
        'conv1.weight': (8, 3, 3, 3), 'bn1.weight': (8,), 'bn1.bias': (8,),
        'bn1.running_mean': (8,), 'bn1.running_var': (8,), 'bn1.num_batches_tracked': (),
        'fc.weight': (10, 8), 'fc.bias': (10,)}
    np.testing.assert_array_equal(state_dict['conv1.weight'][5, 2, 0, 1],
                                  variables['params']['conv1']['kernel'][0, 1, 2, 5])
    np.testing.assert_array_equal(state_dict['bn1.running_var'],
                                  variables['batch_stats']['bn1']['var'])
    back = torch_layout.from_state_dict(state_dict, abstract)
    for path, leaf in leaves_with_paths(variables).items():
        np.testing.assert_array_equal(leaves_with_paths(back)[path], leaf)
