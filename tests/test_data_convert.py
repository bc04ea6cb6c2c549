"""bam_jax.data.convert: a TFRecord TFDS data set built here, converted, read back."""

import functools
import io
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from bam_jax.data import convert as convert_lib
from bam_jax.data import crops as crops_lib
from bam_jax.data import sources

# Its module fixtures (a TFDS build, the command's output: 33 s) are built by one worker.
pytestmark = pytest.mark.xdist_group('data_convert')

NAME = 'convert_photos'
SPLITS = {'train': 30, 'validation': 12}
NUM_SHARDS = 3
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _examples(split: str) -> list[tuple[np.ndarray, bytes, int]]:
    """(pixels, encoded file, label): crops of real photos, PNG and JPEG alternately.

    The label is the photo a crop comes from.
    """
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    rng = np.random.default_rng(list(SPLITS).index(split))
    examples = []
    for index in range(SPLITS[split]):
        label = int(rng.integers(len(photos)))
        height, width = rng.integers(20, 48, 2)
        top = rng.integers(photos[label].shape[0] - height)
        left = rng.integers(photos[label].shape[1] - width)
        pixels = photos[label][top:top + height, left:left + width]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format='PNG' if index % 2 else 'JPEG')
        examples.append((pixels, buffer.getvalue(), label))
    return examples


class ConvertPhotos(tfds.core.GeneratorBasedBuilder):
    """The encoded files are stored as they are, so a byte copy can be checked."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'label': tfds.features.ClassLabel(names=['astronaut', 'chelsea', 'coffee'])}),
            disable_shuffling=True)  # records in generation order

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        for index, (_, encoded, label) in enumerate(_examples(split)):
            yield index, {'image': encoded, 'label': label}


def _shard_names(split: str, suffix: str) -> list[str]:
    return [f'{NAME}-{split}.{suffix}-{index:05d}-of-{NUM_SHARDS:05d}'
            for index in range(NUM_SHARDS)]


def _assert_reads_back(data_dir: str, split: str):
    """TfdsSource gives the original file bytes, pixels and labels, in order."""
    source = sources.TfdsSource(NAME, split, data_dir)
    assert len(source) == SPLITS[split]
    for index, (pixels, encoded, label) in enumerate(_examples(split)):
        record = source[index]
        assert record['image'] == encoded and record['label'] == label
        decoded = np.asarray(crops_lib.decode(record['image']))
        if index % 2:  # PNG: lossless
            np.testing.assert_array_equal(decoded, pixels)
        else:
            np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(encoded))))
            assert np.abs(decoded.astype(int) - pixels).mean() < 12  # the same photo


def _main(capsys, *argv) -> tuple[int, str]:
    code = convert_lib.main(list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope='module')
def tfrecord_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp('tfrecord'))
    ConvertPhotos(data_dir=data_dir, file_format='tfrecord').download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=NUM_SHARDS))
    version_dir = os.path.join(data_dir, NAME, '1.0.0')
    for split in SPLITS:
        assert set(_shard_names(split, 'tfrecord')) <= set(os.listdir(version_dir))
    return data_dir


@pytest.fixture(scope='module')
def converted_dir(tfrecord_dir, tmp_path_factory):
    """The command, in a fresh process with 2 worker processes, into --out_dir."""
    out_dir = str(tmp_path_factory.mktemp('array_record'))
    result = subprocess.run(
        [sys.executable, '-m', 'bam_jax.data.convert', '--name', NAME, '--data_dir',
         tfrecord_dir, '--out_dir', out_dir, '--workers', '2'],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'train (30 records), validation (12 records): 6 ArrayRecord shards' in result.stdout
    return out_dir


def test_command_converts_to_array_record_that_tfds_and_sources_read(tfrecord_dir,
                                                                     converted_dir):
    version_dir = os.path.join(converted_dir, NAME, '1.0.0')
    assert os.listdir(os.path.join(converted_dir, NAME)) == ['1.0.0']  # no staging left
    shards = _shard_names('train', 'array_record') + _shard_names('validation', 'array_record')
    assert sorted(os.listdir(version_dir)) == sorted(
        shards + ['dataset_info.json', 'features.json', 'label.labels.txt'])
    with open(os.path.join(tfrecord_dir, NAME, '1.0.0', 'dataset_info.json')) as file:
        before = json.load(file)
    with open(os.path.join(version_dir, 'dataset_info.json')) as file:
        after = json.load(file)
    assert before['fileFormat'] == 'tfrecord' and after['fileFormat'] == 'array_record'
    assert after['splits'] == before['splits']  # shard lengths, byte counts, templates
    assert [len(split['shardLengths']) for split in after['splits']] == [NUM_SHARDS] * 2
    assert {key: value for key, value in after.items() if key != 'fileFormat'} == {
        key: value for key, value in before.items() if key != 'fileFormat'}

    for split in SPLITS:
        _assert_reads_back(converted_dir, split)
    config = ml_collections.ConfigDict(dict(source='tfds', name=NAME, data_dir=converted_dir,
                                            split='validation'))
    source = sources.make_source(config)
    assert len(source) == 12 and source[11]['image'] == _examples('validation')[11][1]
    decoded = tfds.data_source(NAME, split='train', data_dir=converted_dir, download=False)
    np.testing.assert_array_equal(decoded[5]['image'], _examples('train')[5][0])  # PNG


def test_chosen_splits_and_overwrite(tfrecord_dir, converted_dir, tmp_path, capsys):
    with pytest.raises(sources.DataError, match='stored as FileFormat.TFRECORD.*python -m '
                       f'bam_jax.data.convert --name {NAME} --data_dir {tfrecord_dir} --out_dir'):
        sources.TfdsSource(NAME, 'train', tfrecord_dir)
    out_dir = str(tmp_path)
    converted = convert_lib.convert(NAME, tfrecord_dir, out_dir, splits=['validation'])
    assert converted.directory == os.path.join(out_dir, NAME, '1.0.0')
    assert converted.splits == {'validation': 12} and converted.num_shards == NUM_SHARDS
    with open(os.path.join(tfrecord_dir, NAME, '1.0.0', 'dataset_info.json')) as file:
        splits = json.load(file)['splits']
    assert converted.num_bytes == int(splits[1]['numBytes'])  # the serialized examples
    _assert_reads_back(out_dir, 'validation')
    with pytest.raises(sources.DataError, match="Unknown split 'train'"):
        sources.TfdsSource(NAME, 'train', out_dir)

    code, error = _main(capsys, '--name', NAME, '--data_dir', tfrecord_dir, '--out_dir',
                        out_dir, '--workers', '1')
    assert code == 1 and error == (f'error: {out_dir}/{NAME}/1.0.0 already exists: pass '
                                   '--overwrite to replace it, or choose another --out_dir.')
    code, _ = _main(capsys, '--name', NAME, '--data_dir', tfrecord_dir, '--out_dir', out_dir,
                    '--workers', '1', '--overwrite')
    assert code == 0
    for split in SPLITS:
        _assert_reads_back(out_dir, split)
    assert sorted(os.listdir(os.path.join(out_dir, NAME))) == ['1.0.0']


def test_remote_out_dir_goes_through_tf_gfile(tfrecord_dir, tmp_path):
    """TensorFlow's in-memory `ram://` file system stands in for gs://."""
    import tensorflow as tf

    remote = f'ram://{tmp_path.name}'
    converted = convert_lib.convert(NAME, tfrecord_dir, remote, splits=['validation'])
    assert converted.directory == f'{remote}/{NAME}/1.0.0'
    local = tmp_path / NAME / '1.0.0'
    local.mkdir(parents=True)
    for name in tf.io.gfile.listdir(converted.directory):
        tf.io.gfile.copy(f'{converted.directory}/{name}', str(local / name))
    assert sorted(os.listdir(local)) == sorted(
        _shard_names('validation', 'array_record')
        + ['dataset_info.json', 'features.json', 'label.labels.txt'])
    _assert_reads_back(str(tmp_path), 'validation')


def test_errors_are_one_line_and_leave_nothing_behind(tfrecord_dir, converted_dir, tmp_path,
                                                      capsys):
    def fails(*argv) -> str:
        code, error = _main(capsys, *argv)
        assert code == 1 and len(error.splitlines()) == 1 and error.startswith('error: ')
        return error

    assert '--data_dir is missing' in fails('--name', NAME)
    assert '--name is missing' in fails('--data_dir', tfrecord_dir)
    assert '--out_dir is missing' in fails('--name', NAME, '--data_dir', tfrecord_dir)
    assert fails('--name', NAME, '--data_dir', tfrecord_dir, '--out_dir', tfrecord_dir,
                 '--overwrite') == (f'error: --out_dir {tfrecord_dir} would overwrite the '
                                    'TFRecord data set itself; choose another directory.')
    out = str(tmp_path / 'out')
    missing = str(tmp_path / 'nowhere')
    assert fails('--name', NAME, '--data_dir', missing, '--out_dir', out) == (
        f"error: --data_dir '{missing}' is not a directory.")
    assert fails('--name', 'no_such_data', '--data_dir', tfrecord_dir, '--out_dir', out) == (
        "error: No TFDS data set 'no_such_data': it is not registered with TFDS and there is "
        f'no {tfrecord_dir}/no_such_data/<version>/dataset_info.json.')
    assert fails('--name', 'mnist', '--data_dir', tfrecord_dir, '--out_dir', out).startswith(
        "error: TFDS data set 'mnist' is not prepared in "
        f'{tfrecord_dir}: looked for {tfrecord_dir}/mnist/3.0.1/dataset_info.json')
    assert fails('--name', f'{NAME}:2.0.0', '--data_dir', tfrecord_dir, '--out_dir', out
                 ).endswith(f'cannot be loaded at version 2.0.0, only: 1.0.0.')
    other_version = tmp_path / 'other_version'
    shutil.copytree(os.path.join(tfrecord_dir, NAME, '1.0.0'), other_version / NAME / '0.9.0')
    assert fails('--name', NAME, '--data_dir', str(other_version), '--out_dir', out).endswith(
        f'1.0.0/dataset_info.json; prepared versions there: 0.9.0 (pass --name '
        f'{NAME}:<version>).')
    assert fails('--name', NAME, '--data_dir', converted_dir, '--out_dir', out) == (
        f"error: '{NAME}' in {converted_dir}/{NAME}/1.0.0 is already in ArrayRecord format; "
        'TfdsSource reads it as it is.')
    assert fails('--name', NAME, '--data_dir', tfrecord_dir, '--out_dir', str(tmp_path),
                 '--splits', 'train,test') == (
        f"error: '{NAME}' has no split 'test'; it has train, validation.")

    damaged = str(tmp_path / 'damaged')
    shutil.copytree(tfrecord_dir, damaged)
    shard = os.path.join(damaged, NAME, '1.0.0', _shard_names('train', 'tfrecord')[1])
    with open(shard, 'r+b') as file:
        file.truncate(os.path.getsize(shard) - 100)
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    error = fails('--name', NAME, '--data_dir', damaged, '--out_dir', str(out_dir),
                  '--workers', '1')
    assert error.startswith(f'error: Cannot read TFRecord shard {shard}: truncated record')
    assert os.listdir(out_dir / NAME) == []  # the staging directory is gone
    os.remove(shard)
    assert fails('--name', NAME, '--data_dir', damaged, '--out_dir', str(out_dir)) == (
        f'error: {shard} is missing: the TFRecord data set in '
        f'{os.path.dirname(shard)} is incomplete.')
    assert os.listdir(out_dir / NAME) == []


def test_exit_status_of_the_command(tfrecord_dir):
    """A wrong name fails before TensorFlow is imported: one line, fast."""
    result = subprocess.run(
        [sys.executable, '-m', 'bam_jax.data.convert', '--name', 'no_such_data',
         '--data_dir', tfrecord_dir, '--out_dir', tfrecord_dir + '_out'],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ''
    assert result.stderr == (
        "error: No TFDS data set 'no_such_data': it is not registered with TFDS and there is "
        f'no {tfrecord_dir}/no_such_data/<version>/dataset_info.json.\n')
