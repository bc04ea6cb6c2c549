"""Data as users have it, generated: an ImageNet-shaped TFDS data set and the same images as
image folders, labelled and unlabelled.

- `make_tfds_imagenet(root)`: a TFDS data_dir in which `tfds.builder('imagenet2012',
  data_dir=...)` is prepared, as `tfds build imagenet2012 --file_format=array_record` leaves
  it: `imagenet2012/5.1.0/dataset_info.json` (the registered builder's info: features,
  description, supervised keys) and `imagenet2012-{train,validation}.array_record-0000X-of-
  00002` shards written by TFDS's own writer and example serializer, with imagenet2012's
  features (`image` JPEG, `label` of its 1,000 classes, `file_name`). `file_format=
  'tfrecord'` gives the layout `tfds build` writes by default, for `bam_jax.data.convert`.
- `make_image_folders(root)`: the same JPEG files as `labelled/{train,validation}/<synset>/
  <file_name>` (ImageFolder order = ImageNet label order) and as `flat/train/<file_name>`
  (unlabelled) beside a labelled `flat/validation/<synset>/`.

Images are JPEGs of 40-200 px sides, square and not, a few of them grayscale, of 4 classes
(the first 4 ImageNet synsets) told apart by a dominant colour and a stripe direction, so a
kNN on raw pixels beats chance. Everything is a pure function of fixed seeds.

`make_tfds_finetune(root)` adds fine-tuning's data sets beside imagenet2012:
imagenet2012_subset's '1pct' and '10pct' and CIFAR-shaped cifar10 / cifar100.

- `make_davis(root)`: a DAVIS-2017 root as DAVIS ships it (`JPEGImages/480p/<seq>/*.jpg`,
  `Annotations/480p/<seq>/*.png` indexed in DAVIS's palette, `ImageSets/2017/val.txt`) of
  short generated videos: textured objects (squares and discs) moving over a textured
  background, several per sequence, occluding each other; `make_tfds_davis(root)` the same
  videos as TFDS's `davis/480p` in ArrayRecord format (TFDS's writer, the registered
  builder's features).

Session fixtures of the same names (`tfds_imagenet_dir`, `tfds_finetune_dir`, `tfds_imagenet_tfrecord_dir`,
`image_folder_labelled`, `image_folder_flat`, `davis_root`, `tfds_davis_dir`) are available
to every test module (`pytest_plugins` in conftest.py). `python tests/user_data.py DIR` writes them all to DIR.
"""

import functools
import io
import json
import os
import shutil
import subprocess
import sys

import filelock

import numpy as np
from PIL import Image
import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME, VERSION = 'imagenet2012', '5.1.0'
# The first 4 of imagenet2012's sorted synsets: labels 0-3 of its 1,000 classes.
SYNSETS = ('n01440764', 'n01443537', 'n01484850', 'n01491361')
SPLITS = {'train': 32, 'validation': 12}  # images per class
NUM_SHARDS = 2
# A dominant colour and a stripe direction (radians) per class.
_COLOURS = ((200, 60, 50), (60, 170, 70), (50, 80, 200), (210, 190, 60))
_ANGLES = (0.0, np.pi / 2, np.pi / 4, -np.pi / 4)


def photo(rng, height, width):
    """A smooth colour image with noise, so JPEG has something realistic to encode."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(2, 9) * y + rng.uniform(0, 6))
                for _ in range(3)]
    image = 127.5 * (1 + np.stack(channels, -1)) + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def class_image(rng, label: int, height: int, width: int) -> np.ndarray:
    """A photo-like texture over class `label`'s colour and stripes, uint8 [h, w, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    angle = _ANGLES[label] + rng.normal(0, 0.1)
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / 12
                     + rng.uniform(0, 2 * np.pi))
    image = (0.55 * np.asarray(_COLOURS[label]) + 0.25 * photo(rng, height, width)
             + 50 * stripes[..., None])
    return np.clip(image, 0, 255).astype(np.uint8)


@functools.cache
def examples(split: str) -> tuple[tuple[str, bytes, int], ...]:
    """(file_name, JPEG bytes, label) of a split, class after class; ImageNet's file names
    (`n01440764_7.JPEG`, `ILSVRC2012_val_00000007.JPEG`)."""
    rng = np.random.default_rng(list(SPLITS).index(split))
    result = []
    for label, synset in enumerate(SYNSETS):
        for index in range(SPLITS[split]):
            height, width = (int(side) for side in rng.integers(40, 201, 2))
            if index % 4 == 0:
                width = height  # some square
            image = Image.fromarray(class_image(rng, label, height, width))
            if index % 11 == 5:
                image = image.convert('L')  # grayscale JPEGs exist in ImageNet too
            buffer = io.BytesIO()
            image.save(buffer, format='JPEG', quality=int(rng.integers(75, 96)))
            number = label * SPLITS[split] + index + 1
            file_name = (f'{synset}_{index}.JPEG' if split == 'train'
                         else f'ILSVRC2012_val_{number:08d}.JPEG')
            result.append((file_name, buffer.getvalue(), label))
    return tuple(result)


def _build_tfds(data_dir: str, file_format: str) -> None:
    """Writes the data set with TFDS (imports TensorFlow: run in its own process)."""
    import tensorflow_datasets as tfds

    registered = tfds.builder(NAME, data_dir=data_dir, file_format=file_format)
    tfds.dataset_builders.store_as_tfds_dataset(
        name=NAME, version=VERSION, features=registered.info.features, data_dir=data_dir,
        split_datasets={split: [(file_name, dict(image=encoded, label=label,
                                                 file_name=file_name))
                                for file_name, encoded, label in examples(split)]
                        for split in SPLITS},
        file_format=file_format,
        download_config=tfds.download.DownloadConfig(num_shards=NUM_SHARDS))
    # The metadata of the registered builder (description, citation, supervised keys,
    # module), with the splits just written, as `tfds build imagenet2012` leaves it.
    prepared = tfds.builder(NAME, data_dir=data_dir)
    prepared.info.write_to_directory(prepared.data_dir)


# Fine-tuning's data sets (configs/finetune_*.py), beside imagenet2012 by `make_tfds_finetune`:
# imagenet2012_subset's 1 % / 10 % configs (the first train images of each class, and
# imagenet2012's validation split), and CIFAR-shaped cifar10 / cifar100 (32 px PNGs of
# the same 4 classes: labels 0-3, cifar100's coarse label 0).
SUBSETS = {'1pct': 8, '10pct': 16}  # train images per class
CIFAR_SPLITS = {'train': 16, 'test': 8}  # images per class


def _cifar_examples(split: str) -> list[tuple[str, dict]]:
    rng = np.random.default_rng(10 + list(CIFAR_SPLITS).index(split))
    result = []
    for label in range(len(SYNSETS)):
        for index in range(CIFAR_SPLITS[split]):
            key = f'{split}_{label * CIFAR_SPLITS[split] + index:05d}'
            result.append((key, dict(id=key, image=class_image(rng, label, 32, 32),
                                     label=label)))
    return result


def _build_tfds_finetune(data_dir: str) -> None:
    """Writes imagenet2012_subset/{1pct,10pct}, cifar10 and cifar100 (ArrayRecord) with
    TFDS's writer and the registered builders' features and metadata."""
    import tensorflow_datasets as tfds

    def store(name, config, split_datasets):
        full_name = f'{name}/{config}' if config else name
        registered = tfds.builder(full_name, data_dir=data_dir, file_format='array_record')
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name, version=str(registered.version), config=config,
            features=registered.info.features, data_dir=data_dir,
            split_datasets=split_datasets, file_format='array_record',
            download_config=tfds.download.DownloadConfig(num_shards=1))
        prepared = tfds.builder(full_name, data_dir=data_dir)
        prepared.info.write_to_directory(prepared.data_dir)

    train, validation = examples('train'), examples('validation')
    for config, per_class in SUBSETS.items():
        chosen = [example for example in train
                  if int(example[0].split('_')[1].split('.')[0]) < per_class]
        store('imagenet2012_subset', config, {
            split: [(file_name, dict(image=encoded, label=label, file_name=file_name))
                    for file_name, encoded, label in rows]
            for split, rows in (('train', chosen), ('validation', validation))})
    for name in ('cifar10', 'cifar100'):
        splits = {}
        for split in CIFAR_SPLITS:
            rows = _cifar_examples(split)
            if name == 'cifar100':
                rows = [(key, dict(example, coarse_label=0)) for key, example in rows]
            splits[split] = rows
        store(name, None, splits)


def make_tfds_finetune(root) -> str:
    """A TFDS data_dir with imagenet2012 (as `make_tfds_imagenet`) and fine-tuning's
    data sets (see SUBSETS); written by child processes (TensorFlow)."""
    data_dir = make_tfds_imagenet(root)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), '--tfds-finetune',
                             data_dir], capture_output=True, text=True, timeout=300)
    if result.returncode:
        raise RuntimeError(f'writing the fine-tuning data sets in {data_dir} failed:\n'
                           f'{result.stderr[-3000:]}')
    return data_dir


def make_tfds_imagenet(root, file_format: str = 'array_record') -> str:
    """Writes the generated imagenet2012 into `root` (a TFDS data_dir) and returns it.

    TFDS's writer imports TensorFlow, which must not share a process with torch, so the
    data set is written by a child process.
    """
    data_dir = os.fspath(root)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), '--tfds', data_dir,
                             file_format], capture_output=True, text=True, timeout=300)
    if result.returncode:
        raise RuntimeError(f'writing {NAME} in {data_dir} failed:\n{result.stderr[-3000:]}')
    return data_dir


# DAVIS-shaped videos: name → number of objects; frames of DAVIS_SIZE (H, W).
DAVIS_SEQUENCES = {'blocks': 2, 'marbles': 3}
DAVIS_FRAMES, DAVIS_SIZE, DAVIS_RESOLUTION = 8, (72, 144), '480p'


def davis_video(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 `[T, H, W, 3]`, index masks uint8 `[T, H, W]`) of a generated
    sequence: each object a square or disc of its own texture (a class colour and stripe
    direction), moving in a straight line; later objects in front."""
    rng = np.random.default_rng(sorted(DAVIS_SEQUENCES).index(name) + 10)
    height, width = DAVIS_SIZE
    background = photo(rng, height, width).astype(np.float32)  # desaturated: objects
    background = (0.3 * background + 0.7 * background.mean(-1, keepdims=True)).astype(np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    frames = np.repeat(background[None], DAVIS_FRAMES, axis=0)
    masks = np.zeros((DAVIS_FRAMES, height, width), np.uint8)
    for index in range(1, DAVIS_SEQUENCES[name] + 1):
        side = int(rng.integers(22, 30))
        texture = class_image(rng, (index - 1) % len(_COLOURS), side, side)
        top, left = rng.uniform(4, height - side - 4), rng.uniform(4, width - side - 4)
        step_y, step_x = rng.uniform(-2, 2), rng.uniform(-3.5, 3.5)
        disc = index % 2 == 0
        for t in range(DAVIS_FRAMES):
            row = int(np.clip(round(top + step_y * t), 0, height - side))
            col = int(np.clip(round(left + step_x * t), 0, width - side))
            inside = (y >= row) & (y < row + side) & (x >= col) & (x < col + side)
            if disc:
                inside &= ((y - row - side / 2 + 0.5) ** 2 + (x - col - side / 2 + 0.5) ** 2
                           <= (side / 2) ** 2)
            local = texture[np.clip(y - row, 0, side - 1), np.clip(x - col, 0, side - 1)]
            frames[t][inside] = local[inside]
            masks[t][inside] = index
    return frames, masks


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', quality=95)
    return buffer.getvalue()


def indexed_png(mask: np.ndarray) -> Image.Image:
    """An index mask as DAVIS stores it: a 'P' PNG in the PASCAL VOC palette."""
    from bam_jax.evaluate.davis import davis_palette
    image = Image.fromarray(mask)
    image.putpalette(davis_palette().ravel().tolist())
    return image


def make_davis(root) -> str:
    """Writes the generated DAVIS-2017 root into `root` and returns it."""
    root = os.fspath(root)
    for name in DAVIS_SEQUENCES:
        frames, masks = davis_video(name)
        for kind in ('JPEGImages', 'Annotations'):
            os.makedirs(os.path.join(root, kind, DAVIS_RESOLUTION, name), exist_ok=True)
        for t, (frame, mask) in enumerate(zip(frames, masks)):
            with open(os.path.join(root, 'JPEGImages', DAVIS_RESOLUTION, name,
                                   f'{t:05d}.jpg'), 'wb') as file:
                file.write(jpeg(frame))
            indexed_png(mask).save(os.path.join(root, 'Annotations', DAVIS_RESOLUTION, name,
                                                f'{t:05d}.png'))
    os.makedirs(os.path.join(root, 'ImageSets', '2017'), exist_ok=True)
    with open(os.path.join(root, 'ImageSets', '2017', 'val.txt'), 'w') as file:
        file.write(''.join(f'{name}\n' for name in DAVIS_SEQUENCES))
    return root


def _build_tfds_davis(data_dir: str) -> None:
    """TFDS's `davis/480p` of the same videos (imports TensorFlow: its own process)."""
    import tensorflow_datasets as tfds

    registered = tfds.builder('davis/480p', data_dir=data_dir)
    examples = []
    for name in DAVIS_SEQUENCES:
        frames, masks = davis_video(name)
        examples.append((name, dict(
            video=dict(frames=[jpeg(frame) for frame in frames],
                       segmentations=[mask[..., None] for mask in masks]),
            metadata=dict(num_frames=len(frames), video_name=name))))
    tfds.dataset_builders.store_as_tfds_dataset(
        name='davis', version=str(registered.info.version), config='480p',
        features=registered.info.features, data_dir=data_dir,
        split_datasets={'validation': examples}, file_format='array_record')
    prepared = tfds.builder('davis/480p', data_dir=data_dir)
    prepared.info.write_to_directory(prepared.data_dir)


def make_tfds_davis(root) -> str:
    data_dir = os.fspath(root)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), '--tfds-davis',
                             data_dir], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPOSITORY))
    if result.returncode:
        raise RuntimeError(f'writing davis in {data_dir} failed:\n{result.stderr[-3000:]}')
    return data_dir


def make_image_folders(root) -> tuple[str, str]:
    """(labelled root, flat root) below `root`: `labelled/{train,validation}/<synset>/
    <file>`, and `flat/train/<file>` unlabelled beside a labelled `flat/validation`."""
    labelled, flat = os.path.join(root, 'labelled'), os.path.join(root, 'flat')
    for split in SPLITS:
        for file_name, encoded, label in examples(split):
            paths = [os.path.join(labelled, split, SYNSETS[label], file_name),
                     os.path.join(flat, split, file_name) if split == 'train' else
                     os.path.join(flat, split, SYNSETS[label], file_name)]
            for path in paths:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, 'wb') as file:
                    file.write(encoded)
    return labelled, flat


def shipped_config(*overrides: str, config: str = 'vit_small_imagenet'):
    """`configs/<config>.py` with command-line overrides (`--config.data.data_dir=...`),
    parsed as train.py parses them."""
    from absl import flags
    from ml_collections import config_flags

    argv = ['train.py', f'--config={REPOSITORY}/configs/{config}.py', *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def dataset_info(data_dir: str) -> dict:
    with open(os.path.join(data_dir, NAME, VERSION, 'dataset_info.json')) as file:
        return json.load(file)


def built_once(tmp_path_factory, name: str, build):
    """`build(directory)` run once per test session and its (JSON) result, shared by the
    pytest-xdist workers: the first to ask builds under a file lock in their common
    temporary root, the others wait and read. A failed build is retried by the next."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # every worker's basetemp is a child of the session's
    directory = root / name
    result = root / f'{name}.json'
    with filelock.FileLock(f'{directory}.lock'):
        if not result.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            result.write_text(json.dumps(build(directory)))
    return json.loads(result.read_text())


@pytest.fixture(scope='session')
def tfds_imagenet_dir(tmp_path_factory) -> str:
    """A TFDS data_dir with imagenet2012 in ArrayRecord format (128 train, 48 validation)."""
    return built_once(tmp_path_factory, 'tfds_imagenet', make_tfds_imagenet)


@pytest.fixture(scope='session')
def tfds_finetune_dir(tmp_path_factory) -> str:
    """imagenet2012 as `tfds_imagenet_dir`, with imagenet2012_subset/{1pct,10pct},
    cifar10 and cifar100 beside it (`make_tfds_finetune`)."""
    return built_once(tmp_path_factory, 'tfds_finetune', make_tfds_finetune)


@pytest.fixture(scope='session')
def tfds_imagenet_tfrecord_dir(tmp_path_factory) -> str:
    """The same imagenet2012 in TFRecord format (`tfds build`'s default)."""
    return built_once(tmp_path_factory, 'tfds_imagenet_tfrecord',
                      functools.partial(make_tfds_imagenet, file_format='tfrecord'))


@pytest.fixture(scope='session')
def _image_folders(tmp_path_factory) -> tuple[str, str]:
    return tuple(built_once(tmp_path_factory, 'image_folders',
                            lambda root: make_image_folders(str(root))))


@pytest.fixture(scope='session')
def image_folder_labelled(_image_folders) -> str:
    """`R/{train,validation}/<synset>/<file>`: the TFDS set's images and labels."""
    return _image_folders[0]


@pytest.fixture(scope='session')
def image_folder_flat(_image_folders) -> str:
    """`R/train/<file>` (unlabelled, the TFDS set's train images) and `R/validation/
    <synset>/<file>` (labelled)."""
    return _image_folders[1]


@pytest.fixture(scope='session')
def davis_root(tmp_path_factory) -> str:
    """A DAVIS-2017 root of the generated videos (DAVIS's layout, val split)."""
    return built_once(tmp_path_factory, 'davis', make_davis)


@pytest.fixture(scope='session')
def tfds_davis_dir(tmp_path_factory) -> str:
    """A TFDS data_dir with the same videos as `davis/480p` (ArrayRecord)."""
    return built_once(tmp_path_factory, 'tfds_davis', make_tfds_davis)


if __name__ == '__main__':
    if sys.argv[1] == '--tfds':
        _build_tfds(*sys.argv[2:])
    elif sys.argv[1] == '--tfds-finetune':
        _build_tfds_finetune(*sys.argv[2:])
    elif sys.argv[1] == '--tfds-davis':
        _build_tfds_davis(sys.argv[2])
    else:
        out = sys.argv[1]
        print(make_tfds_imagenet(os.path.join(out, 'tfds')), *make_image_folders(out))
