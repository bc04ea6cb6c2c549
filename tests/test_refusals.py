"""Bad input writes nothing: every refusal of the README's troubleshooting table leaves the
workdir as it was, whether it did not exist, held a finished run, or was an empty one.

Each refusal is met through the loop (as train.py calls it) and compared by a full listing
(paths, sizes, contents' hashes) before and after; the command-line refusals are run as
`train.py` processes. A new run that finds unreadable images only after it started leaves
no config.json, events file or empty `checkpoints/` behind.
"""

import hashlib
import pathlib
import shutil
import subprocess
import sys

import pytest

from bam_jax.data.sources import DataError
from bam_jax.train import loop
from bam_jax.train.builder import ConfigError
from conftest import REPO, environment
from test_resume import synthetic_config


def listing(directory: pathlib.Path) -> dict[str, str] | None:
    """{relative path: content hash or 'dir'} of everything below `directory`."""
    if not directory.exists():
        return None
    return {str(path.relative_to(directory)): 'dir' if path.is_dir() else
            hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob('*'))}


@pytest.fixture(scope='module')
def folders(tmp_path_factory, image_folder_labelled):
    root = tmp_path_factory.mktemp('folders')
    empty = root / 'empty' / 'train'
    empty.mkdir(parents=True)
    small = root / 'small' / 'train'  # 4 images: fewer than a batch
    small.mkdir(parents=True)
    images = sorted(pathlib.Path(image_folder_labelled).glob('train/*/*'))
    for image in images[:4]:
        shutil.copy(image, small / image.name)
    broken = root / 'broken' / 'train'  # unreadable images among readable ones
    broken.mkdir(parents=True)
    for index, image in enumerate(images[:24]):
        shutil.copy(image, broken / image.name)
        if index % 3 == 0:
            (broken / f'broken_{index}.JPEG').write_bytes(b'not a jpeg')
    return {name: root / name for name in ('empty', 'small', 'broken')}


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('finished') / 'run'
    loop.train_and_evaluate(synthetic_config(), str(workdir))
    return workdir


def _folder(config, root, **data):
    config.data.update(source='folder', data_dir=str(root) if root else None, **data)
    config.update(batch_size=8)
    config.loss.top_k = 4


def _resnet_with_contrastive_crop(config):
    config.data.ccrop = True
    config.model.update(name='resnet50', stage_depths=(1, 1, 1, 1), width=8)


# name: (change(config, folders), train_and_evaluate flags, error, message)
REFUSALS = {
    'folder without data_dir': (lambda c, f: _folder(c, None), {}, DataError,
                                'needs config.data.data_dir'),
    'folder without images': (lambda c, f: _folder(c, f['empty']), {}, DataError,
                              'holds no images'),
    'fewer images than a batch': (lambda c, f: _folder(c, f['small']), {}, DataError,
                                  'fewer than one global batch'),
    'unreadable images': (lambda c, f: _folder(c, f['broken']), {}, DataError,
                          'unreadable, more than config.data.max_bad_fraction'),
    'batch not divisible': (lambda c, f: c.update(batch_size=63), {}, ConfigError,
                            'is not divisible by the'),
    'top-k too large': (lambda c, f: c.loss.update(top_k=4096), {}, ConfigError,
                        'must be below the number of target columns'),
    'ContrastiveCrop without attention': (lambda c, f: _resnet_with_contrastive_crop(c), {},
                                          ConfigError, 'needs attention maps'),
    '--fresh with --from_step': (lambda c, f: None, dict(fresh=True, from_step=2),
                                 ConfigError, 'pass one of them'),
    '--fresh with --force_config': (lambda c, f: None, dict(fresh=True, force_config=True),
                                    ConfigError, 'pass one of them'),
    '--from_step that does not exist': (lambda c, f: None, dict(from_step=7), ConfigError,
                                        'no such checkpoint'),
    'a key that defines the run changed': (lambda c, f: c.update(epochs=5), {}, ConfigError,
                                           'holds a run made'),
}


@pytest.mark.parametrize('refusal', sorted(REFUSALS))
@pytest.mark.parametrize('workdir_is', ['missing', 'finished', 'empty'])
def test_a_refusal_leaves_the_workdir_as_it_was(refusal, workdir_is, folders, finished_run,
                                                tmp_path):
    change, flags, error, message = REFUSALS[refusal]
    if refusal == 'a key that defines the run changed' and workdir_is != 'finished':
        pytest.skip('only a workdir with a run can hold another run')
    workdir = tmp_path / 'run'
    if workdir_is == 'finished':
        shutil.copytree(finished_run, workdir)
    elif workdir_is == 'empty':
        workdir.mkdir()
    config = synthetic_config()
    change(config, folders)
    if workdir_is == 'finished':  # the changed data may be what is refused first
        error, message = (error, ConfigError), f'{message}|holds a run made'
    before = listing(workdir)
    with pytest.raises(error, match=message) as raised:
        loop.train_and_evaluate(config, str(workdir), **flags)
    assert '\n' not in str(raised.value)
    assert listing(workdir) == before


def test_train_py_refusals_are_one_line_and_write_nothing(tmp_path, folders):
    """The command line's own refusals, and a run whose images turn out unreadable."""
    workdir = tmp_path / 'run'
    cases = [(['--config.optimizer.lrr=1'], 'no such config key'),
             ([f'--config={tmp_path}/missing.py'], 'cannot load this config file'),
             (['--fresh', '--from_step=3'], 'pass one of them'),
             (['--from_step=3'], 'no such checkpoint'),
             ([f'--config={REPO}/configs/vit_small_imagenet.py',
               '--config.data.source=folder', f'--config.data.data_dir={folders["broken"]}',
               '--config.batch_size=8', '--config.loss.top_k=4', '--config.data.num_workers=0',
               '--config.model.depth=1', '--config.model.embed_dim=32',
               '--config.model.num_heads=2', '--config.model.img_size=32',
               '--config.model.patch_size=8', '--config.crops.global_size=32',
               '--config.crops.local_size=16', '--config.data.ccrop=False',
               '--config.knn.every_epochs=0'], 'unreadable')]
    for flags, message in cases:
        result = subprocess.run([sys.executable, str(REPO / 'train.py'),
                                 f'--workdir={workdir}', *flags], env=environment(1),
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], (
            flags, result.stderr[-2000:])
        assert 'Traceback' not in result.stderr, flags
        assert not workdir.exists(), flags  # no workdir, no checkpoints/, no config.json
