"""The linear probe against a NumPy transcription of the official one, its feature layout,
and `python -m bam_jax.evaluate` as users run it: subprocesses on the checkpoints of a
real small MNIST run (`small_mnist_run`, shared with test_run.py).
"""

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from bam_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from bam_jax.evaluate import extract_features, linear
from bam_jax.models.resnet import ResNet
from bam_jax.models.vit import vit
from bam_jax.train import metrics_log
from conftest import (REPO, SMALL, TINY, changed_copy, corrupt_checkpoint, data_mesh,
                      environment)

# One test worker runs this module, so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group('evaluate')

# ------------------------------------------------------------------ the probe itself

NUM_CLASSES, SIDE, BATCH = 3, 4, 16


def separable_problem(n, seed):
    """uint8 4×4 images: a fixed random pattern per class plus noise; labels 0-2."""
    patterns = np.random.default_rng(0).uniform(40, 215, (NUM_CLASSES, SIDE, SIDE, 3))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = patterns[labels] + rng.normal(0, 25, (n, SIDE, SIDE, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int32)


def host_batches(images, labels, order):
    """Batches of BATCH rows in `order`; the last padded with invalid rows."""
    padded = np.concatenate([order, np.full(-len(order) % BATCH, -1)])
    for start in range(0, len(padded), BATCH):
        rows = padded[start:start + BATCH]
        yield {'image': np.where((rows >= 0)[:, None, None, None], images[rows], 0),
               'label': np.where(rows >= 0, labels[rows], -1), 'valid': rows >= 0}


def flat_pixels(images):
    return images.reshape(images.shape[0], -1)


def run_probe(mesh, train, test, *, epochs, lr, bn_head):
    features_fn = jax.jit(flat_pixels)
    batches = list(host_batches(*test, np.arange(len(test[1]))))
    test_features = extract_features(features_fn, batches, mesh=mesh)
    return linear.linear_probe(
        features_fn, lambda epoch: host_batches(*train, epoch_order(len(train[1]), epoch)),
        test_features, mesh=mesh, num_classes=NUM_CLASSES, epochs=epochs, lr=lr,
        bn_head=bn_head, seed=3)


def epoch_order(n, epoch):
    return np.random.default_rng([7, epoch]).permutation(n)


def numpy_probe(train, test, *, epochs, lr, bn_head, kernel):
    """The official `eval_linear.py` loop in float64 NumPy: torch's SGD (v ← 0.9v + g),
    `lr × 16 / 256`, `CosineAnnealingLR` per epoch, CE mean over the real rows of each
    batch (the official last batch is simply smaller), BatchNorm1d(affine=False, eps=1e-6).
    Returns the final (kernel, bias, running mean, running var) and top-1 per epoch."""
    def normalise(images):
        x = images.astype(np.float64) / 255.0
        return flat_pixels((x - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD))

    kernel, bias = kernel.astype(np.float64), np.zeros(NUM_CLASSES)
    v_kernel, v_bias = np.zeros_like(kernel), np.zeros_like(bias)
    running_mean, running_var = np.zeros(kernel.shape[0]), np.ones(kernel.shape[0])
    top1 = []
    for epoch in range(epochs):
        rate = lr * BATCH / 256 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for batch in host_batches(*train, epoch_order(len(train[1]), epoch)):
            x, y = normalise(batch['image'][batch['valid']]), batch['label'][batch['valid']]
            n = len(y)
            if bn_head:
                mean, var = x.mean(0), x.var(0)
                x = (x - mean) / np.sqrt(var + 1e-6)
                running_mean = 0.9 * running_mean + 0.1 * mean
                running_var = 0.9 * running_var + 0.1 * var * n / (n - 1)
            logits = x @ kernel + bias
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            g = (p - np.eye(NUM_CLASSES)[y]) / n
            v_kernel = 0.9 * v_kernel + x.T @ g
            v_bias = 0.9 * v_bias + g.sum(0)
            kernel, bias = kernel - rate * v_kernel, bias - rate * v_bias
        x = normalise(test[0])
        if bn_head:
            x = (x - running_mean) / np.sqrt(running_var + 1e-6)
        top1.append(100.0 * np.mean(np.argmax(x @ kernel + bias, 1) == test[1]))
    return (kernel, bias, running_mean, running_var), top1


@pytest.mark.parametrize('bn_head', [False, True], ids=['linear', 'bn_head'])
def test_linear_probe_learns_and_matches_numpy_on_1_and_4_devices(bn_head):
    train, test = separable_problem(56, seed=1), separable_problem(40, seed=2)
    settings = dict(epochs=3, lr=2.0, bn_head=bn_head)
    one, four = (run_probe(data_mesh(n), train, test, **settings) for n in (1, 4))
    initial = linear.init_classifier(jax.random.key(3), SIDE * SIDE * 3, NUM_CLASSES, bn_head)
    (kernel, bias, mean, var), top1 = numpy_probe(
        train, test, kernel=np.asarray(initial.params['kernel']), **settings)

    got = one.classifier
    np.testing.assert_allclose(got.params['kernel'], kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.params['bias'], bias, rtol=1e-4, atol=1e-5)
    if bn_head:
        np.testing.assert_allclose(got.batch_stats['mean'], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.batch_stats['var'], var, rtol=1e-5)
    assert [epoch['top1'] for epoch in one.per_epoch] == pytest.approx(top1)
    assert [epoch['lr'] for epoch in one.per_epoch] == pytest.approx(
        [2.0 * 16 / 256 * factor for factor in (1.0, 0.75, 0.25)])
    assert one.last_top1 >= 95 and one.per_epoch[0]['top1'] < one.last_top1 + 1e-9
    assert one.top1 == max(top1) and one.top5 == 100.0  # 3 classes: top-5 is everything
    # 4 devices: the same training, up to the order of the gradient all-reduce.
    for leaf_one, leaf_four in zip(jax.tree.leaves(one.classifier),
                                   jax.tree.leaves(four.classifier)):
        np.testing.assert_allclose(leaf_four, leaf_one, rtol=1e-5, atol=1e-7)
    assert [e['top1'] for e in four.per_epoch] == [e['top1'] for e in one.per_epoch]


def test_feature_layout_is_get_intermediate_layers_convention():
    backbone = vit('tiny', embed_dim=16, depth=4, num_heads=2, patch_size=4, img_size=8)
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    variables = backbone.init(jax.random.key(0), images)
    encoded = backbone.apply(variables, images, method='encode', n_last_blocks=4)
    blocks = [np.asarray(block) for block in encoded['blocks']]  # normed, oldest first
    assert len(blocks) == 4 and blocks[0].shape == (3, 5, 16)
    assert not np.allclose(blocks[0][:, 0], blocks[3][:, 0])

    four = np.asarray(linear.feature_layout(backbone, n_last_blocks=4, avgpool=False)(
        variables, images))
    np.testing.assert_array_equal(four, np.concatenate([b[:, 0] for b in blocks], axis=1))
    np.testing.assert_allclose(four[:, -16:], backbone.apply(variables, images), atol=1e-6)

    pooled = np.asarray(linear.feature_layout(backbone, n_last_blocks=1, avgpool=True)(
        variables, images))
    assert pooled.shape == (3, 32)
    np.testing.assert_array_equal(pooled[:, 0::2], blocks[-1][:, 0])  # cls_0, avg_0, ...
    np.testing.assert_allclose(pooled[:, 1::2], blocks[-1][:, 1:].mean(axis=1), atol=1e-6)

    with pytest.raises(ValueError, match='avgpool needs linear.n_last_blocks=1'):
        linear.feature_layout(backbone, n_last_blocks=2, avgpool=True)
    with pytest.raises(ValueError, match='n_last_blocks=5, but the ViT has 4 blocks'):
        linear.feature_layout(backbone, n_last_blocks=5, avgpool=False)
    with pytest.raises(ValueError, match='ResNet gives one pooled feature vector'):
        linear.feature_layout(ResNet(), n_last_blocks=4, avgpool=False)


# ------------------------------------------------------------------ the command

RUN_CONFIG = (f'--run_config={TINY}',
              *(flag.replace('--config.', '--run_config.') for flag in SMALL))
# Three epochs (12 SGD steps); the other MNIST settings come from the run's config.
FAST_LINEAR = ('--config.linear.epochs=3',)
FAST_LOW_LABEL = ('--config.fewshot.n_episodes=50', '--config.kmeans.n_init=2',
                  '--config.attention.num_images=2')


MNIST_LINEAR = dict(bn_head=True, lr=0.1, crop_scale=(0.85, 1.0), flip_prob=0.0)


def test_settings_come_from_the_run_config_then_the_command_line():
    from configs import evaluate as evaluate_config, mnist, vit_base_imagenet
    from bam_jax.evaluate import runner

    def resolved(run_config, **overrides):
        config = evaluate_config.get_config()
        config.update_from_flattened_dict(overrides)  # as `--config.<key>=` does
        return runner.protocol_config(config, run_config, overrides)

    defaults = evaluate_config.get_config().linear
    config, line = resolved(vit_base_imagenet.get_config())
    assert config.linear == defaults and line == 'settings: configs/evaluate.py'
    # configs/mnist.py, as a file or as a workdir's config.json (tuples as lists).
    as_json = ml_collections.ConfigDict(json.loads(mnist.get_config().to_json()))
    for run_config in (mnist.get_config(), as_json):
        config, line = resolved(run_config, **{'linear.lr': 0.5, 'linear.epochs': 7})
        assert {key: config.linear[key] for key in MNIST_LINEAR} == {**MNIST_LINEAR,
                                                                     'lr': 0.5}
        assert (config.linear.epochs, config.linear.n_last_blocks) == (7, 4)
        assert line == ("settings: configs/evaluate.py, then the run config's evaluation "
                        'section (linear.bn_head=True, linear.crop_scale=(0.85, 1.0), '
                        'linear.flip_prob=0.0), then the command line (linear.lr=0.5, '
                        'linear.epochs=7)')
    misspelt = mnist.get_config()
    misspelt.evaluation.linear.learning_rate = 0.1
    with pytest.raises(runner.EvaluationError,
                       match=r"the run config's evaluation.linear.learning_rate is not a key "
                             'of configs/evaluate.py'):
        resolved(misspelt)


def test_probe_progress_every_tenth_with_eta():
    assert linear.progress_epochs(100) == {0, *range(9, 100, 10)}
    assert linear.progress_epochs(3) == {0, 1, 2}
    assert linear.progress_epochs(15) == {0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14}
    assert [metrics_log.duration(s) for s in (41.6, 185, 7620)] == ['42 s', '3 min 05 s',
                                                                      '2 h 07 min']


def evaluate(*flags):
    return subprocess.run([sys.executable, '-m', 'bam_jax.evaluate', *map(str, flags)],
                          env=environment(4), cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)


def succeeded(result, out):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(pathlib.Path(out).read_text())


@pytest.fixture(scope='module')
def exported(small_mnist_run, tmp_path_factory):
    out = tmp_path_factory.mktemp('export') / 'teacher.safetensors'
    result = subprocess.run([sys.executable, '-m', 'bam_jax.export', '--workdir',
                             str(small_mnist_run), '--out', str(out)], env=environment(1),
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return out


def test_workdir_and_exported_file_give_the_same_numbers(small_mnist_run, exported,
                                                         tmp_path):
    result = evaluate(
        '--workdir', small_mnist_run, *FAST_LINEAR, *FAST_LOW_LABEL,
        '--config.protocols=knn,linear,fewshot,retrieval,kmeans,attention',
        '--out', tmp_path / 'workdir.json')
    from_workdir = succeeded(result, tmp_path / 'workdir.json')
    # The default 4 blocks of the ViT-S protocol, on this 1-block ViT: one line, then 1.
    assert 'linear: n_last_blocks=4 clamped to 1, all that the VisionTransformer gives' \
        in result.stdout.splitlines()
    assert from_workdir['config']['linear']['n_last_blocks'] == 1
    # The export keeps the run's config beside the weights: no --run_config needed.
    result = evaluate('--backbone', exported, '--config.protocols=knn',
                      '--out', tmp_path / 'file.json')
    from_file = succeeded(result, tmp_path / 'file.json')
    # A workdir's config.json is a config file, overridable like configs/*.py (its unset
    # knn.train_split included), and the evaluation reads the run's kNN train split.
    from_json = succeeded(evaluate(
        '--backbone', exported, f'--run_config={small_mnist_run}/config.json',
        '--run_config.knn.train_split=test', '--config.protocols=knn', '--out',
        tmp_path / 'json.json'), tmp_path / 'json.json')
    assert from_json['data']['train_split'] == 'test'
    assert from_json['model'] == from_file['model']
    assert (from_workdir['step'], from_workdir['weights']) == (62, 'teacher')
    assert from_workdir['data'] == from_file['data']
    assert from_workdir['data']['train_split'] == 'train'
    assert from_workdir['data']['test_split'] == 'test'
    knn = from_workdir['results']['knn']
    assert from_file['results']['knn'] == knn
    assert 20 < knn['top1'] <= knn['top5'] <= 100
    probe = from_workdir['results']['linear']
    assert 15 < probe['top1'] <= 100 and len(probe['epochs']) == 3  # chance: 10
    assert {key: from_workdir['config']['linear'][key] for key in MNIST_LINEAR} == {
        **MNIST_LINEAR, 'crop_scale': [0.85, 1.0]}  # configs/mnist.py's evaluation section
    assert set(from_workdir['seconds']) == {'features', 'knn', 'linear', 'fewshot',
                                            'retrieval', 'kmeans', 'attention'}
    assert re.search(rf'^knn +top1 +{knn["top1"]:.2f}$', result.stdout, re.M)  # the table
    # The other protocols' modules, wired with the options of configs/evaluate.py.
    numbers = from_workdir['results']
    assert 20 < numbers['fewshot']['accuracy'] <= 100 and numbers['fewshot']['ci95'] > 0
    recalls = [numbers['retrieval'][f'recall@{k}'] for k in (1, 2, 4, 8)]
    assert recalls == sorted(recalls) and 0 < recalls[0]
    assert 0 < numbers['kmeans']['nmi'] <= 100
    figures = sorted((tmp_path / 'workdir.attention').iterdir())
    assert [path.name for path in figures] == numbers['attention']['files']
    assert len(figures) == 2 and all(path.suffix == '.png' for path in figures)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        'file.json', 'json.json', 'workdir.attention', 'workdir.json']  # no temporary left


def test_pixel_and_random_baselines(small_mnist_run, tmp_path):
    pixels = succeeded(evaluate('--workdir', small_mnist_run, '--features=pixels',
                                '--config.protocols=knn', '--out', tmp_path / 'pixels.json'),
                       tmp_path / 'pixels.json')
    # The README's raw-pixel kNN on the MNIST default's data (normalised 32×32×3).
    assert pixels['results']['knn'] == pytest.approx({'top1': 92.8, 'top5': 99.3})
    random_init = succeeded(evaluate(*RUN_CONFIG, '--features=random',
                                     '--config.protocols=knn', '--out',
                                     tmp_path / 'random.json'), tmp_path / 'random.json')
    assert random_init['features'] == 'random' and random_init['model']['embed_dim'] == 32
    assert 10 < random_init['results']['knn']['top1'] < 92.8


def test_the_command_says_where_its_settings_come_from():
    result = evaluate(*RUN_CONFIG, '--features=pixels', '--config.protocols=knn',
                      '--config.linear.lr=0.5', '--config.data.batch_size=3')
    assert result.returncode == 1  # stopped before any feature: 3 images on 4 devices
    assert result.stderr.strip() == ('error: config.data.batch_size=3 is not divisible by '
                                     'the 4 devices')
    assert result.stdout.splitlines() == [
        "settings: configs/evaluate.py, then the run config's evaluation section "
        '(linear.bn_head=True, linear.crop_scale=(0.85, 1.0), linear.flip_prob=0.0), then '
        "the command line (protocols='knn', linear.lr=0.5, data.batch_size=3)"]


@pytest.mark.parametrize('case, change, flags, message', [
    ('missing workdir', shutil.rmtree, [], r'workdir .*run does not exist'),
    ('missing step', None, ['--step', '7'],
     r'no checkpoint for step 7 .*available steps: \[50, 60, 62\]'),
    ('corrupt', lambda workdir: corrupt_checkpoint(workdir, 62), [], r'checkpoints/62 is corrupt or unreadable: '),
    ('wrong architecture', None, ['backbone'],
     r'teacher.safetensors \(per teacher.json\) is for another architecture: '
     r'embed_dim=32 \(requested 256\)'),
    ('misspelt key', None, ['--config.linear.epoch=3'],
     r'--config.linear.epoch: no such config key .*Did you mean "epochs"'),
])
def test_bad_input_is_one_line_and_leaves_no_file(small_mnist_run, exported, tmp_path,
                                                  case, change, flags, message):
    workdir, out = changed_copy(small_mnist_run, tmp_path, change)
    if flags == ['backbone']:  # the file of the small run, the tiny run's config
        flags = ['--backbone', exported, f'--run_config={TINY}']
    else:
        flags = ['--workdir', workdir, *flags]
    result = evaluate(*flags, '--config.protocols=knn', '--out', out / 'results.json')
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert list(out.iterdir()) == []


def test_few_shot_on_four_classes_is_clamped_or_refused_before_any_feature(
        image_folder_labelled):
    """The defaults' 5-way episodes on a 4-class folder: clamped to 4 ways with one line;
    on its validation split (12 images a class, fewer than 5 + 15) refused in one line,
    before any feature is computed."""
    folder = ('--run_config=configs/vit_small_imagenet.py', '--run_config.data.source=folder',
              f'--run_config.data.data_dir={image_folder_labelled}',
              '--run_config.knn.image_size=32', '--run_config.knn.resize_size=36',
              '--run_config.knn.batch_size=32', '--features=pixels',
              '--config.protocols=fewshot', '--config.fewshot.n_episodes=10')
    clamped = evaluate(*folder, '--config.fewshot.split=train',
                       '--config.data.train_fraction=1.0')
    assert clamped.returncode == 0, clamped.stderr[-2000:]
    assert ('fewshot: n_way=5 clamped to 4, the classes of the train split with 5 + 15 '
            'examples') in clamped.stdout.splitlines()
    refused = evaluate(*folder)
    assert refused.returncode == 1 and 'features of both splits' not in refused.stdout
    assert refused.stderr.strip() == (
        'error: fewshot: the test split has 0 classes with fewshot.n_shot + '
        'fewshot.n_query = 20 examples, and an episode needs 2; lower '
        '--config.fewshot.n_query')


def test_ctrl_c_is_one_line_and_writes_nothing(small_mnist_run, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the process group) during the linear probe."""
    process = subprocess.Popen(
        [sys.executable, '-m', 'bam_jax.evaluate', '--workdir', str(small_mnist_run),
         '--config.linear.epochs=1000', '--out', str(tmp_path / 'results.json')],
        env=environment(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    for line in process.stdout:  # the probe's first epoch: well inside the work
        if line.startswith('linear epoch 1/1000'):
            break
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr == 'Stopped by SIGINT; nothing was written.\n'
    assert list(tmp_path.iterdir()) == []
