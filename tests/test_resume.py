"""What a restart does with its workdir: resume rules, --from_step, --fresh, bad input.

The copies of the small reference run (`small_mnist_run`: 62 steps on 4 devices,
checkpoints 50, 60, 62) are resumed by real `train.py` subprocesses; the refusals and
bad inputs, which stop before any compilation, call the loop directly.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from bam_jax.train import loop
from bam_jax.train.builder import ConfigError
from bam_jax.train.checkpoint import Checkpointer
from conftest import REPO, environment, finish, start
from test_run import losses, small_config, truncate_newest_array_file


@pytest.fixture
def copy(small_mnist_run, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(small_mnist_run, workdir)
    return workdir


def synthetic_config(**data):
    """The small network on 256 random images: 2 steps an epoch."""
    config = small_config()
    config.epochs = 1
    config.data.update(source='synthetic', synthetic_num_examples=256,
                       synthetic_image_shape=(40, 48), **data)
    return config


def test_a_finished_run_started_again_says_so_and_recomputes_nothing(copy):
    metrics = (copy / 'metrics.jsonl').read_bytes()
    events = sorted(copy.glob('events.out.tfevents.*'))
    assert finish(start(copy), copy) == 0
    log = pathlib.Path(f'{copy}.log').read_text()
    assert 'had finished at step 62: nothing to do' in log
    assert 'It had finished before: nothing was recomputed.' in log
    assert f'python -m bam_jax.export --workdir={copy} ' in log  # what to run next
    assert (copy / 'metrics.jsonl').read_bytes() == metrics
    assert sorted(copy.glob('events.out.tfevents.*')) == events  # no empty events file


def test_a_changed_batch_size_is_refused_in_one_line(copy):
    config_json = (copy / 'config.json').read_text()
    result = subprocess.run(
        [sys.executable, str(REPO / 'train.py'), f'--config={REPO}/tests/run_configs/'
         'tiny_mnist.py', f'--workdir={copy}', '--config.batch_size=64'],
        env=environment(4), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f'error: {copy} holds a run made with config.batch_size=128, '
                            'not 64')
    assert '--force_config' in error and '--fresh' in error
    assert (copy / 'config.json').read_text() == config_json  # nothing written
    assert sorted(Checkpointer(copy / 'checkpoints').all_steps()) == [50, 60, 62]


@pytest.mark.parametrize('key,value', [('epochs', 3), ('data.source', 'synthetic'),
                                       ('model.depth', 2)])
def test_keys_that_define_the_run_cannot_change_on_resume(copy, key, value):
    config = small_config()
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
        node = node[parent]
    saved = node[leaf]
    node[leaf] = value
    with pytest.raises(ConfigError, match=f'config.{key}={saved!r}, not {value!r}'):
        loop.train_and_evaluate(config, str(copy))


def test_run_control_keys_may_change_and_force_config_resumes_anyway(copy):
    config = small_config()
    config.log_every_steps = 7  # steering only: allowed, the run has finished
    assert loop.train_and_evaluate(config, str(copy))['finished_before']
    config.epochs = 3
    with pytest.raises(ConfigError):
        loop.train_and_evaluate(config, str(copy))
    config.epochs = 2
    config.optimizer.lr *= 2  # defines the run: accepted only when forced
    with pytest.raises(ConfigError, match='config.optimizer.lr='):
        loop.train_and_evaluate(config, str(copy))
    assert loop.train_and_evaluate(config, str(copy), force_config=True)['finished_before']


def test_from_step_resumes_there_and_moves_later_checkpoints_aside(copy, small_mnist_run):
    assert finish(start(copy, '--from_step=50'), copy) == 0
    assert 'Resumed from step 50.' in pathlib.Path(f'{copy}.log').read_text()
    assert losses(copy) == losses(small_mnist_run)  # steps 51-62 again, exactly
    replaced, = (copy / 'replaced').iterdir()
    assert sorted(path.name for path in (replaced / 'checkpoints').iterdir()) == ['60', '62']
    assert sorted(Checkpointer(copy / 'checkpoints').all_steps()) == [50, 60, 62]


def test_fresh_starts_afresh_and_keeps_the_old_run(tmp_path):
    workdir = tmp_path / 'run'
    first = loop.train_and_evaluate(synthetic_config(), str(workdir))
    assert first['step'] == 2
    old_config = json.loads((workdir / 'config.json').read_text())
    changed = synthetic_config()
    changed.batch_size = 64  # another run: refused without --fresh
    with pytest.raises(ConfigError):
        loop.train_and_evaluate(changed, str(workdir))
    second = loop.train_and_evaluate(changed, str(workdir), fresh=True)
    assert second['step'] == 4 and not second['finished_before']
    replaced, = (workdir / 'replaced').iterdir()
    assert {'checkpoints', 'config.json', 'metrics.jsonl'} <= {
        path.name for path in replaced.iterdir()}
    assert json.loads((replaced / 'config.json').read_text()) == old_config
    assert sorted(Checkpointer(replaced / 'checkpoints').all_steps()) == [2]
    assert sorted(Checkpointer(workdir / 'checkpoints').all_steps()) == [4]


@pytest.mark.parametrize('change,message', [
    (lambda config: config.update(batch_size=0), 'config.batch_size=0'),
    (lambda config: config.update(batch_size=-8), 'config.batch_size=-8'),
    (lambda config: config.loss.update(top_k=-1), 'config.loss.top_k=-1'),
    (lambda config: config.optimizer.update(warmup_epochs=-1),
     'config.optimizer.warmup_epochs=-1'),
    (lambda config: config.update(compute_dtype='fp8'), "config.compute_dtype='fp8'"),
    (lambda config: config.model.update(attention='flash'), "config.model.attention='flash'"),
])
def test_bad_values_are_one_line_naming_the_key(tmp_path, change, message):
    config = synthetic_config()
    change(config)
    with pytest.raises(ConfigError, match=message) as error:
        loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert '\n' not in str(error.value)
    assert not (tmp_path / 'run').exists()  # nothing written


def test_a_workdir_that_is_a_file_or_cannot_be_written(tmp_path):
    afile = tmp_path / 'afile'
    afile.write_text('keep me')
    with pytest.raises(ConfigError, match=f'--workdir {afile} is a file'):
        loop.train_and_evaluate(synthetic_config(), str(afile))
    assert afile.read_text() == 'keep me'
    with pytest.raises(ConfigError, match='cannot be written'):
        loop.train_and_evaluate(synthetic_config(), str(afile / 'run'))
    with pytest.raises(ConfigError, match='cannot be written'):  # even for root
        loop.train_and_evaluate(synthetic_config(), '/proc/bam_jax_run')


def test_train_py_reports_a_bad_workdir_in_one_line_and_exit_1(tmp_path):
    afile = tmp_path / 'afile'
    afile.write_text('keep me')
    result = subprocess.run(
        [sys.executable, str(REPO / 'train.py'), f'--workdir={afile}',
         '--config.epochs=1'], env=environment(1), cwd=REPO, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f'error: --workdir {afile} is a file; give a directory.')
    assert 'Traceback' not in result.stderr and afile.read_text() == 'keep me'


def test_a_partial_latest_checkpoint_is_set_aside_and_the_run_resumes(copy, small_mnist_run,
                                                                      caplog):
    """A save cut short (a data file missing): one warning naming the step, the step kept
    in WORKDIR/corrupt/, the run continues from the step before (on 8 devices here, so
    the losses agree to float rounding)."""
    data_files = sorted((copy / 'checkpoints' / '62' / 'state').rglob('d/*'),
                        key=lambda path: path.stat().st_size)
    data_files[-1].unlink()
    with caplog.at_level('WARNING'):
        result = loop.train_and_evaluate(small_config(), str(copy))
    assert result['step'] == 62 and not result['finished_before']
    warnings = [record.getMessage() for record in caplog.records
                if 'corrupt or unreadable' in record.getMessage()]
    assert len(warnings) == 1 and 'checkpoints/62 is corrupt' in warnings[0]
    assert 'resuming from step 60' in warnings[0]
    assert (copy / 'corrupt' / '62' / 'state').is_dir()
    resumed, expected = losses(copy), losses(small_mnist_run)
    for step in (61, 62):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4), step


def test_the_workdirs_config_json_is_a_config_file(copy):
    """`--config=WORKDIR/config.json` is the run's own config: the same run, finished."""
    result = subprocess.run(
        [sys.executable, str(REPO / 'train.py'), f'--config={copy}/config.json',
         f'--workdir={copy}'], env=environment(4), cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'It had finished before: nothing was recomputed.' in result.stdout


def test_runs_shows_the_steps_which_restore_and_the_last_numbers(copy, tmp_path):
    truncate_newest_array_file(copy / 'checkpoints' / '62')
    result = subprocess.run([sys.executable, '-m', 'bam_jax.runs', str(copy)],
                            env=environment(1), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f'{copy}: vit (embed_dim 32, depth 1, num_heads 2')
    assert "on mnist 'train'; batch 128, 2 epochs" in lines[0]
    assert '  unfinished: step 60 of 62 (97 %); train.py with the same flags resumes it' in lines
    assert '  checkpoints: 50 intact, 60 intact, 62 BROKEN' in lines
    assert any(line.startswith('  last logged (step 62): loss ') for line in lines)
    assert not any('kNN' in line for line in lines)  # the small run had it off
    assert result.stderr == ''  # orbax's reader threads print nothing after the failure
    missing = subprocess.run([sys.executable, '-m', 'bam_jax.runs', str(tmp_path / 'none')],
                             env=environment(1), cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f'error: workdir {tmp_path / "none"} does not exist'


def test_a_run_saved_before_a_key_existed_resumes_under_its_neutral_value():
    """A run saved before `model.drop_path_rate` existed trained without drop path: it
    resumes under 0.0, and only under 0.0."""
    from bam_jax.train import resume
    saved = json.loads(small_config().to_json_best_effort())
    del saved['model']['drop_path_rate']
    current = json.loads(small_config().to_json_best_effort())
    assert resume.config_changes(saved, current) == ([], [])
    current['model']['drop_path_rate'] = 0.1
    assert resume.config_changes(saved, current)[0] == [
        ('model.drop_path_rate', '(absent)', 0.1)]
