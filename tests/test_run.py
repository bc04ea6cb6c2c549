"""`train.py` end to end, as users run it: subprocesses on simulated devices.

The MNIST default, run once as the README's quickstart, shows that BAM learns and ends at
the kNN the README quotes; its logs are read back as TensorBoard reads them. A much smaller
uninterrupted reference run (1 process × 4 devices, every step logged) is compared with
runs that were killed, interrupted, or resumed onto another device count; two processes
on 127.0.0.1 are compared with it in tests/test_sharded_state.py (which also shards the
state) and run the pod-shaped test in tests/test_pod.py.
"""

import importlib.util
import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from bam_jax.data import sources
from bam_jax.train import builder, loop, metrics_log, online
from bam_jax.train.checkpoint import Checkpointer, abstract_like
from conftest import REPO, SMALL, TINY, command, environment, finish, start


STEPS = 62  # two epochs of 4,000 digits at batch 128
DEFAULT_STEPS = 310  # the MNIST default's 10 epochs
# The default logs every 10 steps and at the end.
LOGGED_STEPS = [*range(10, DEFAULT_STEPS + 1, 10)]


def load_config(path=TINY):
    spec = importlib.util.spec_from_file_location('run_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def small_config():
    """`load_config()` with the `SMALL` overrides applied, as `train.py` applies them."""
    config = load_config()
    for flag in SMALL:
        key, value = flag[len('--config.'):].split('=')
        *parents, leaf = key.split('.')
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = int(value)
    return config


def losses(workdir) -> dict[int, float]:
    return {step: scalars['loss'] for step, scalars in metrics_log.read_metrics(workdir).items()
            if 'loss' in scalars}


def wait_for_step(workdir, step: int, process, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, pathlib.Path(f'{workdir}.log').read_text()[-3000:]
        if (pathlib.Path(workdir) / 'metrics.jsonl').exists() and max(
                losses(workdir), default=0) >= step:
            return
        time.sleep(0.1)
    raise TimeoutError(f'{workdir} did not reach step {step}')


@pytest.fixture(scope='module')
def reference(small_mnist_run):
    return small_mnist_run


# The tests of the default run share one worker, which runs it once (a module fixture is
# set up again on every pytest-xdist worker that runs one of its tests).
ON_THE_DEFAULT_RUN = pytest.mark.xdist_group('default_run')


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
    """`python train.py` as the README's quickstart runs it: the default config on one
    device, only the workdir given (and a profile of 3 steps and `-X importtime`, which
    change no figure). Its 310 steps take about 3 minutes; every test of the run's
    output reads this one."""
    workdir = tmp_path_factory.mktemp('default') / 'mnist'
    with open(f'{workdir}.log', 'w') as log:
        process = subprocess.Popen(
            [sys.executable, '-X', 'importtime', 'train.py', f'--workdir={workdir}',
             '--config.profile_steps=3'],
            env=environment(1, optimized=True), cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT)
        assert finish(process, workdir, timeout=1200) == 0
    return workdir


def test_typo_in_an_override_fails_at_once(tmp_path):
    result = subprocess.run(command(tmp_path / 'run', '--config.optimizer.lrr=1'),
                            env=environment(1), cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert 'lrr' in result.stderr and 'optimizer' in result.stderr
    assert not (tmp_path / 'run').exists()  # nothing written


def test_bad_values_name_the_key(tmp_path):
    result = subprocess.run(command(tmp_path / 'run', '--config.batch_size=63'),
                            env=environment(4), cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert 'config.batch_size=63 is not divisible by the 4 devices' in result.stderr


@ON_THE_DEFAULT_RUN
def test_the_default_run_learns_and_saves_its_config(default_run):
    config = json.loads((default_run / 'config.json').read_text())
    assert config['epochs'] == 10 and config['profile_steps'] == 3  # the override
    metrics = metrics_log.read_metrics(default_run)
    assert sorted(losses(default_run)) == LOGGED_STEPS
    first, last = metrics[10]['loss'], metrics[DEFAULT_STEPS]['loss']
    assert last < first - 0.1
    for name in ('learning_rate', 'weight_decay', 'teacher_momentum', 'sinkhorn_reg',
                 'grad_norm', 'param_norm', 'source_entropy', 'target_entropy',
                 'embedding_std', 'images_per_sec'):
        assert np.isfinite(metrics[DEFAULT_STEPS][name]), name
    # kNN against the same backbone at random initialisation (86.3): measured 93.5 for
    # the student and for the teacher; 4.0 points leave room for another CPU's rounding.
    random_init = random_init_knn()
    for network in ('student', 'teacher'):
        trained = metrics[DEFAULT_STEPS][f'knn/{network}_top1']
        assert metrics[DEFAULT_STEPS][f'knn/{network}_top5'] >= trained
        assert trained >= random_init + 4.0, (network, trained, random_init)
    assert sorted(Checkpointer(default_run / 'checkpoints').all_steps()) == [248, 279, 310]


@ON_THE_DEFAULT_RUN
def test_the_default_run_ends_at_the_readmes_knn(default_run):
    """The final kNN is the one the README quotes, for student and teacher, beside raw
    pixels' 92.8. The run is deterministic on one device (it gave the same figures in two
    clones); 0.5 points allow another CPU's rounding over 310 steps. A default that
    learns less fails: the previous one ended at 90.5, another seed of this one at 92.7."""
    quoted = float(re.search(r'digits: ([\d.]+) % for the student and for the teacher',
                             (REPO / 'README.md').read_text())[1])
    final = metrics_log.read_metrics(default_run)[DEFAULT_STEPS]
    print(f"README {quoted}; student {final['knn/student_top1']}, "
          f"teacher {final['knn/teacher_top1']}")
    assert abs(final['knn/student_top1'] - quoted) <= 0.5
    assert abs(final['knn/teacher_top1'] - quoted) <= 0.5
    # The end of the run says what it learned: its kNN beside raw pixels' on the same
    # split (evaluate --features=pixels gives 92.8 too), computed once, kept in the workdir.
    summary = [line for line in pathlib.Path(f'{default_run}.log').read_text().splitlines()
               if line.startswith(f'The run finished at step {DEFAULT_STEPS} (kNN ')]
    assert len(summary) == 1 and summary[0].endswith(
        '; raw pixels 92.8 % top-1 on the same split).'), summary
    assert json.loads((default_run / 'knn_pixels.json').read_text())['knn']['top1'] == 92.8


@ON_THE_DEFAULT_RUN
def test_tensorboard_shows_the_scalars_hyperparameters_and_profile(default_run):
    """Read back by TensorBoard's own reader: the event files are written without
    TensorFlow (7 s of every start, not imported by the run), so this proves the format."""
    accumulator = event_accumulator.EventAccumulator(str(default_run), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    accumulator.Reload()
    metrics = metrics_log.read_metrics(default_run)
    for name in ('loss', 'learning_rate', 'steps_per_sec', 'knn/student_top1'):
        logged = {event.step: event.value for event in accumulator.Scalars(name)}
        expected = {step: scalars[name] for step, scalars in metrics.items()
                    if name in scalars}
        assert sorted(logged) == sorted(expected) and logged, name
        np.testing.assert_allclose([logged[step] for step in sorted(logged)],
                                   [expected[step] for step in sorted(logged)], rtol=1e-6)
    assert len(accumulator.Scalars('loss')) == len(LOGGED_STEPS)
    content = accumulator.PluginTagToContent('hparams')[
        hparams_metadata.SESSION_START_INFO_TAG]
    hparams = hparams_metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams['batch_size'].number_value == 128
    assert hparams['model.name'].string_value == load_config().model.name
    assert list(default_run.glob('plugins/profile/*/*.xplane.pb'))  # profile_steps=3
    log = pathlib.Path(f'{default_run}.log').read_text()
    assert f'Profile of steps 11-13 written to {default_run}/plugins/profile' in log
    assert f'Step {DEFAULT_STEPS}/{DEFAULT_STEPS} (100%): ' in log
    imported = {line.rsplit('|', 1)[1].strip() for line in log.splitlines()
                if line.startswith('import time:')}
    assert {'jax', 'tensorboard', 'clu'} <= imported and 'tensorflow' not in imported


def random_init_knn() -> float:
    config = load_config(REPO / 'configs' / 'mnist.py')
    mesh = loop.data_mesh()
    training = builder.build_training(config, mesh, steps_per_epoch=STEPS)
    knn = online.OnlineKnn(config, training.network.backbone,
                           sources.make_source(config.data), mesh)
    return knn(training.state)['knn/teacher_top1']


def committed_steps(workdir) -> list[str]:
    """Checkpoint steps whose save has finished (orbax renames a step's directory last)."""
    return [path.name for path in (pathlib.Path(workdir) / 'checkpoints').iterdir()
            if path.name.isdigit()]


def truncate_newest_array_file(checkpoint_step: pathlib.Path):
    """Cuts the largest array data file of a checkpoint step in half (a write cut short)."""
    largest = max((path for path in (checkpoint_step / 'state').rglob('d/*')),
                  key=lambda path: path.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])


def test_kill_9_and_a_truncated_checkpoint_resume_the_uninterrupted_losses(reference,
                                                                          tmp_path):
    workdir = tmp_path / 'run'
    process = start(workdir)
    wait_for_step(workdir, 25, process)
    # Saves finish in the background: under load, step 20's may still be in flight.
    deadline = time.time() + 120
    while len(committed_steps(workdir)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    steps = sorted(Checkpointer(workdir / 'checkpoints').all_steps())
    assert len(steps) >= 2 and 10 <= steps[-1] <= 60, steps
    truncate_newest_array_file(workdir / 'checkpoints' / str(steps[-1]))
    assert finish(start(workdir), workdir) == 0
    log = pathlib.Path(f'{workdir}.log').read_text()
    warning = [line for line in log.splitlines() if 'is corrupt or unreadable' in line]
    assert len(warning) == 1 and f'checkpoints/{steps[-1]} is corrupt' in warning[0]
    assert f'resuming from step {steps[-2]}' in warning[0]
    assert f'Resumed from step {steps[-2]}.' in log
    assert (workdir / 'corrupt' / str(steps[-1]) / 'state').is_dir()  # kept
    assert losses(workdir) == losses(reference)  # exactly


def test_ctrl_c_saves_then_resumes_onto_two_devices(reference, tmp_path):
    workdir = tmp_path / 'run'
    process = start(workdir)
    wait_for_step(workdir, 13, process)
    process.send_signal(signal.SIGINT)
    assert finish(process, workdir) == 128 + signal.SIGINT
    log = pathlib.Path(f'{workdir}.log').read_text()
    saved = int(log.split('Stopped by SIGINT: saved step ')[1].split(';')[0])
    assert saved >= 13 and saved in Checkpointer(workdir / 'checkpoints').all_steps()
    assert 'Traceback' not in log
    assert finish(start(workdir, devices=2), workdir) == 0  # 4 → 2 devices
    resumed = losses(workdir)
    expected = losses(reference)
    assert sorted(resumed) == sorted(expected)
    for step in range(saved + 1, STEPS + 1):  # another device count: float rounding only
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4), step


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_nan_input_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path,
                                                            monkeypatch):
    workdir = tmp_path / 'run'
    shutil.copytree(reference, workdir)
    config = small_config()
    config.epochs = 3  # continue after the reference's last checkpoint ...
    real_augment = builder.augment_crops

    def poisoned(batch, config_crops, rng):  # ... on crops that are all NaN
        augmented = real_augment(batch, config_crops, rng)
        return {key: value * np.nan if key in ('global', 'local') else value
                for key, value in augmented.items()}

    monkeypatch.setattr(builder, 'augment_crops', poisoned)
    with pytest.raises(loop.NonFiniteError, match=f'step {STEPS + 1}: non-finite'):
        loop.train_and_evaluate(config, str(workdir), force_config=True)  # longer run
    assert Checkpointer(workdir / 'checkpoints').latest_step() == STEPS


def ccrop_config():
    """The small network on 256 random images: 3 epochs of 2 steps, ContrastiveCrop boxes
    after epochs 0 and 1."""
    config = small_config()
    config.epochs = 3
    config.knn.every_epochs = 0
    config.data.update(source='synthetic', synthetic_num_examples=256,
                       synthetic_image_shape=(40, 48), ccrop=True, ccrop_warmup_epochs=0,
                       ccrop_loc_interval=1, ccrop_image_size=32)
    return config


def test_contrastive_crop_boxes_update_on_schedule_and_resume(tmp_path):
    config = ccrop_config()
    # Boxes after epochs 0 and 1 (not after the last), used from epoch 2 on.
    result = loop.train_and_evaluate(config, str(tmp_path))
    assert result['step'] == 6 and result['signal'] is None
    mesh = loop.data_mesh()
    training = builder.build_training(config, mesh, steps_per_epoch=2)
    checkpointer = Checkpointer(tmp_path / 'checkpoints', array_items=('boxes',),
                                json_items=('data', 'config'))
    assert {2, 4, 6} <= set(checkpointer.all_steps())
    state, items = checkpointer.restore(abstract_like(training.state, mesh), step=4)
    source = sources.make_source(config.data)
    expected = online.contrastive_crop_boxes(config, training.network.backbone, state,
                                             source, mesh)  # the update after epoch 1
    np.testing.assert_array_equal(items['boxes'], expected)
    assert items['boxes'].shape == (256, 4)
    assert (items['boxes'][:, :2] < items['boxes'][:, 2:]).all()
