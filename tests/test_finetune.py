"""Fine-tuning (#23): the second task on the training loop; its step, its export to
timm, its bad input, and what pretraining is worth to it (against random initialisation
and the linear probe, on a short deterministic run; docs/evaluation.md has the full-length
figures).
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bam_jax.data import sources
from bam_jax.train import finetune, loop, optimizer as optimizer_lib
from bam_jax.train.builder import ConfigError
from conftest import REPO, command, data_mesh, environment, timm_child
from user_data import shipped_config

# The small MNIST run's network (conftest.SMALL).
SMALL_MODEL = ('--config.model.embed_dim=32', '--config.model.depth=1',
               '--config.model.num_heads=2')


def mnist_config(*overrides):
    return shipped_config(*SMALL_MODEL, *overrides, config='finetune_mnist')


def top1(workdir) -> float:
    return json.loads((pathlib.Path(workdir) / 'metrics.jsonl').read_text()
                      .splitlines()[-1])['eval/top1']


# ---------------------------------------------------------------- a run
@pytest.fixture(scope='module')
def finetuned(tmp_path_factory):
    """The MNIST recipe on the small network from random initialisation, one epoch (31
    steps) on 8 devices, in this process; started again it has finished."""
    workdir = tmp_path_factory.mktemp('finetuned') / 'run'
    config = mnist_config('--config.init.source=random', '--config.epochs=1')
    result = loop.train_and_evaluate(config, str(workdir))
    assert result['task'] == 'finetune' and result['step'] == 31
    assert result['eval/top1'] == pytest.approx(top1(workdir))
    # Started again (the evaluation's batch may change, it steers the run): finished.
    again = mnist_config('--config.init.source=random', '--config.epochs=1',
                         '--config.eval.batch_size=256')
    assert loop.train_and_evaluate(again, str(workdir))['finished_before']
    with pytest.raises(ConfigError, match='config.optimizer.lr=0.002, not 0.001'):
        loop.train_and_evaluate(mnist_config('--config.init.source=random',
                                             '--config.epochs=1',
                                             '--config.optimizer.lr=0.001'), str(workdir))
    return workdir


def test_a_run_logs_its_evaluation_and_resumes_as_pretraining_does(finetuned):
    from bam_jax.train import metrics_log
    metrics = metrics_log.read_metrics(finetuned)
    assert {'loss', 'learning_rate', 'grad_norm', 'images_per_sec'} <= set(metrics[31])
    assert 10 < metrics[31]['eval/top1'] <= metrics[31]['eval/top5'] <= 100
    saved = json.loads((finetuned / 'config.json').read_text())
    assert saved['task'] == 'finetune' and saved['num_classes'] == 10
    # `python -m bam_jax.runs` shows the task's evaluation, as it shows pretraining's kNN.
    from bam_jax import runs
    assert (f'  last evaluation (step 31): top1 {metrics[31]["eval/top1"]:.1f} %, top5 '
            f'{metrics[31]["eval/top5"]:.1f} %') in runs.describe(finetuned)


# ---------------------------------------------------------------- the step
def test_the_step_mixes_each_devices_part_and_decays_only_matrices():
    """With mixup / CutMix, erasing and drop path on, on 4 devices: the step runs, its
    loss is the soft-target cross-entropy, and weight decay skips biases, norms, the
    position table and the class token (timm's rule)."""
    config = mnist_config('--config.regularisers.mixup_alpha=0.8',
                          '--config.regularisers.cutmix_alpha=1.0',
                          '--config.regularisers.erasing_prob=0.25',
                          '--config.init.source=random')
    config.num_classes = 10
    mesh = data_mesh(4)
    training = finetune.build_finetuning(config, mesh, steps_per_epoch=4)
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             'label': rng.integers(0, 10, 16).astype(np.int32)}
    from bam_jax.train.step import shard_batch
    state, metrics = training.train_step(training.state, shard_batch(batch, mesh))
    assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
    assert 0 < float(metrics['loss']) < 10
    mask = optimizer_lib.finetune_decay_mask(state.params)
    flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat['head/kernel'] and not flat['head/bias']
    assert not flat['backbone/pos_embed'] and not flat['backbone/cls_token']
    assert not any(value for key, value in flat.items() if 'norm' in key.split('/')[-2])


def test_soft_target_cross_entropy_is_timms():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    targets = jnp.asarray([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]])
    expected = -np.mean(np.sum(np.asarray(targets) * np.asarray(
        jax.nn.log_softmax(logits)), axis=-1))
    assert float(finetune.soft_target_cross_entropy(logits, targets)) == pytest.approx(
        expected, rel=1e-6)


# ---------------------------------------------------------------- bad input
def test_another_architecture_is_refused_before_any_work(tmp_path):
    """A pretraining workdir (its config.json: the check comes before any checkpoint is
    read) of the small MNIST network, fine-tuned with 8 px patches."""
    from configs import mnist
    pretrained = tmp_path / 'pretrained'
    pretrained.mkdir()
    pretraining = mnist.get_config()
    pretraining.model.update(embed_dim=32, depth=1, num_heads=2)
    (pretrained / 'config.json').write_text(pretraining.to_json_best_effort())
    config = mnist_config(f'--config.init.workdir={pretrained}',
                          '--config.model.patch_size=8')
    with pytest.raises(ConfigError, match=r'pretrained another backbone: patch_size=16 '
                                          r'\(config.model.patch_size=8\)'):
        loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


def test_unlabelled_data_and_a_wrong_head_size_are_refused(image_folder_flat,
                                                           image_folder_labelled, tmp_path):
    config = mnist_config('--config.init.source=random', '--config.data.source=folder',
                          f'--config.data.data_dir={image_folder_flat}',
                          '--config.data.val_split=validation')
    config.num_classes = None
    with pytest.raises(sources.DataError, match='has no labels: fine-tuning needs'):
        loop.train_and_evaluate(config, str(tmp_path / 'a'))
    config = mnist_config('--config.init.source=random', '--config.data.source=folder',
                          f'--config.data.data_dir={image_folder_labelled}',
                          '--config.data.val_split=validation')
    with pytest.raises(ConfigError, match=r'config.num_classes=10, but the folder .* has 4 '
                                          r'classes; set config.num_classes=4'):
        loop.train_and_evaluate(config, str(tmp_path / 'b'))


def test_a_subset_that_is_not_prepared_is_one_error_line(tfds_imagenet_dir, tmp_path):
    """As a user runs it: train.py prints one `error:` line and leaves no workdir."""
    result = subprocess.run(
        [sys.executable, str(REPO / 'train.py'), '--config=configs/finetune_semi.py',
         f'--workdir={tmp_path / "run"}', '--config.init.source=random',
         f'--config.data.data_dir={tfds_imagenet_dir}'],
        cwd=REPO, env=environment(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and 'imagenet2012_subset/1pct' in last, last
    assert 'is not prepared' in last
    assert not (tmp_path / 'run').exists()


# ---------------------------------------------------------------- export to timm
TIMM_LOGITS = r'''
import json, sys
import numpy as np
import torch
jobs_path, arrays_path, out_path = sys.argv[1:4]
job = json.load(open(jobs_path))
namespace = {}
exec('\n'.join(job['load']), namespace)  # the lines the exporter prints: strict=True
model = namespace['model'].eval()
images = torch.from_numpy(np.load(arrays_path)['images']).permute(0, 3, 1, 2)
with torch.no_grad():
    logits = model(images).numpy()
np.savez(out_path, logits=logits)
json.dump({'tensorflow_imported': 'tensorflow' in sys.modules}, open(out_path + '.json', 'w'))
'''


def test_the_classifier_exports_to_timm_and_its_backbone_evaluates(finetuned, tmp_path):
    """`python -m bam_jax.export` on a fine-tuning workdir writes timm's classifier
    (`num_classes=10`, loaded with strict=True) whose logits are bam-jax's to 1e-4; the
    file's backbone imports back for `bam_jax.evaluate --backbone`."""
    from bam_jax import export
    workdir = finetuned
    out = tmp_path / 'classifier.safetensors'
    result = subprocess.run([sys.executable, '-m', 'bam_jax.export', f'--workdir={workdir}',
                             f'--out={out}'], cwd=REPO, env=environment(1),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'classifier (10 classes)' in result.stdout
    summary = json.loads(out.with_suffix('.json').read_text())
    assert summary['model_kwargs']['num_classes'] == 10
    config, state, _ = export.restore_state(pathlib.Path(workdir))
    model = finetune.build_classifier(config)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(model.apply({'params': jax.device_get(state.params)}, images))
    outputs, _ = timm_child(TIMM_LOGITS, summary, {'images': images}, tmp_path)
    np.testing.assert_allclose(outputs['logits'], expected, atol=1e-4)
    imported = export.import_backbone(out, config)
    backbone = jax.device_get(state.params['backbone'])
    for got, want in zip(jax.tree.leaves(imported['params']), jax.tree.leaves(backbone)):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- what pretraining is worth
def run_one_device(workdir, *flags, config=None, module=None, timeout=900):
    """`python train.py` (or `python -m module`) on one optimised CPU device, as a user's
    `python train.py`; its output is kept in `workdir.log`."""
    argv = ([sys.executable, '-m', module, *flags] if module
            else command(workdir, *flags, config=REPO / 'configs' / f'{config}.py'))
    result = subprocess.run(argv, env=environment(1, optimized=True), cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    pathlib.Path(f'{workdir}.log').write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """5 epochs (155 steps) of the MNIST default with the global crops of 40-100 % and
    the all-column targets it had when this was measured (the default until 2026-12-07):
    the shortest run found whose teacher is clearly ahead of its random initialisation
    (kNN 89.1 % against 86.3 %; 2 epochs with local crops leave the teacher where it
    started). With today's default (crops of 85-100 %, top-k 16, and those crops in the
    probe) the probe wins at this length: 88.3 % against 79.2 % from 62 steps of
    fine-tuning (docs/evaluation.md, "Fine-tuning MNIST, measured", has the full runs)."""
    workdir = tmp_path_factory.mktemp('pretrained') / 'run'
    run_one_device(workdir, '--config.epochs=5', '--config.crops.n_local=0',
                   '--config.crops.global_scale=(0.4, 1.0)', '--config.loss.top_k=0',
                   '--config.knn.every_epochs=5', config='mnist')
    return workdir


def test_pretraining_beats_random_init_and_fine_tuning_beats_the_linear_probe(pretrained,
                                                                               tmp_path):
    """Equal steps (2 epochs, 62) of `configs/finetune_mnist.py` at DeiT's own rate (5e-4
    per 512 images; the config's 8× higher rate suits its 10 epochs but, on 62 steps,
    overwrites what 155 steps of pretraining learned): measured 80.1 % from the BAM teacher,
    77.9 % from random initialisation, and 75.3 % for 10 epochs of the linear probe of the
    same teacher. Deterministic on one device; the margins allow another CPU's rounding."""
    def fine_tuned(name, *flags) -> float:
        run_one_device(tmp_path / name, *flags, '--config.epochs=2',
                       '--config.optimizer.lr=2.5e-4', config='finetune_mnist')
        return top1(tmp_path / name)

    from_bam = fine_tuned('bam', f'--config.init.workdir={pretrained}')
    from_random = fine_tuned('random', '--config.init.source=random')
    out = tmp_path / 'linear.json'
    run_one_device(tmp_path / 'linear', f'--workdir={pretrained}', '--config.protocols=linear',
                   '--config.linear.epochs=10', '--config.linear.crop_scale=(0.4, 1.0)',
                   f'--out={out}', module='bam_jax.evaluate')
    linear = json.loads(out.read_text())['results']['linear']['top1']
    print(f'fine-tuned from BAM {from_bam}, from random {from_random}, linear probe {linear}')
    assert from_bam >= from_random + 1.0
    assert from_bam >= linear + 2.5
