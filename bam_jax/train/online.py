"""What the loop computes from the backbone between epochs: online kNN and ContrastiveCrop boxes.

Both run the backbone in eval mode over a whole split with the evaluation input
(`bam_jax.data.eval_input`), sharded over the devices of every process.
"""

from __future__ import annotations

import functools
import json
import logging
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax.data import ccrop, eval_input, sources
from bam_jax.data.sources import describe_split
from bam_jax.evaluate import knn_accuracy, normalize_images
from bam_jax.evaluate.features import PIXELS_SIZE, pixel_features
from bam_jax.train.state import backbone_variables, gathered

PIXEL_KNN_FILE = 'knn_pixels.json'  # the raw-pixel kNN of a run's splits, in its workdir


def _eval_input(config, source, *, image_size: int, resize_size: int | None,
                indices=None, squash: bool = False) -> eval_input.EvalInput:
    return eval_input.make_eval_input(
        source, image_size=image_size, resize_size=resize_size, indices=indices,
        batch_size=config.knn.batch_size // jax.process_count(), squash=squash,
        process_index=jax.process_index(), process_count=jax.process_count())


def _is_labelled(source) -> bool:
    """Whether a split has labels, from its labels array or else its first record (a
    TFDS split is labelled throughout or not at all), so no split is read for this."""
    labels = getattr(source, 'labels', None)
    if labels is not None:
        return bool((np.asarray(labels) >= 0).any())
    return len(source) > 0 and source[0]['label'] >= 0


def has_labelled_splits(config, train_source) -> bool:
    """Whether the kNN's splits (`knn.train_split`, default `data.split`, and
    `knn.val_split`) exist and hold labels: what `python -m bam_jax.evaluate` reads."""
    data = config.data
    split = config.knn.get('train_split') or data.split
    try:
        return all(_is_labelled(train_source if name == data.split
                                else sources.make_source(data, name))
                   for name in (split, config.knn.val_split))
    except sources.DataError:
        return False


def make_online_knn(config, backbone, train_source, mesh: jax.sharding.Mesh
                    ) -> OnlineKnn | None:
    """The online kNN as configured, or None when it is off; logs one line saying which.

    It is off when `knn.every_epochs` is 0, or when its train split (`knn.train_split`,
    default `data.split`, whose source is `train_source`) has no labels, e.g. an
    unlabelled image folder. A `knn.train_split` given explicitly must be labelled, and
    so must `knn.val_split`: otherwise a `DataError` names the key.
    """
    knn, data = config.knn, config.data
    if not knn.every_epochs:
        logging.info('Online kNN off: config.knn.every_epochs=0; set it to N > 0 to '
                     'evaluate every N epochs.')
        return None
    explicit = knn.get('train_split') or None
    split = explicit or data.split
    if split != data.split:
        try:
            train_source = sources.make_source(data, split)
        except sources.DataError as error:
            raise sources.DataError(f'config.knn.train_split={split!r}: {error}') from None
    if hasattr(train_source, 'read_labels'):  # TFDS: read while training starts
        labels = _Background(train_source.read_labels) if _is_labelled(train_source) else None
    else:
        labels = eval_input.source_labels(train_source)
        labels = labels if (labels >= 0).any() else None
    if labels is None:
        if explicit:
            raise sources.DataError(
                f'config.knn.train_split={split!r}: {describe_split(data, split)} has no '
                'labels; name a labelled split, or set config.knn.every_epochs=0.')
        logging.info('Online kNN off: %s has no labels; set config.knn.train_split=<a '
                     'labelled split> to turn it on.', describe_split(data, split))
        return None
    try:
        val_source = sources.make_source(data, knn.val_split)
    except sources.DataError as error:
        raise sources.DataError(f'config.knn.val_split={knn.val_split!r}: {error}') from None
    if not _is_labelled(val_source):
        raise sources.DataError(
            f'config.knn.val_split={knn.val_split!r}: '
            f'{describe_split(data, knn.val_split)} has no labels; name a labelled split, or '
            'set config.knn.every_epochs=0.')
    online_knn = OnlineKnn(config, backbone, train_source, mesh, labels=labels,
                           val_source=val_source)
    if isinstance(labels, _Background):
        bank = (f'{100 * min(knn.train_fraction, 1):g} % of {describe_split(data, split)} '
                '(class-balanced; its labels are read in the background)')
        logging.info('Online kNN every %d epochs: %s against %r (%s images).',
                     knn.every_epochs, bank, knn.val_split, f'{len(val_source):,}')
        return online_knn
    classes = len(np.unique(labels[labels >= 0]))
    if knn.train_fraction >= 1:
        bank = (f'all of {describe_split(data, split)} ({len(labels):,} images, {classes} '
                'classes)')
    else:
        bank = (f'{100 * knn.train_fraction:g} % of {describe_split(data, split)} '
                f'(class-balanced, {online_knn.num_train:,} images, {classes} classes)')
    logging.info('Online kNN every %d epochs: %s against %r (%s images).', knn.every_epochs,
                 bank, knn.val_split, f'{len(val_source):,}')
    return online_knn


class _Background:
    """A value computed in a daemon thread: the run starts without waiting for it, and a
    preempted run exits without waiting for it either."""

    def __init__(self, function):
        self._done = threading.Event()
        self._value = self._error = None
        threading.Thread(target=self._run, args=(function,), daemon=True).start()

    def _run(self, function):
        try:
            self._value = function()
        except BaseException as error:  # pylint: disable=broad-except
            self._error = error
        finally:
            self._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class OnlineKnn:
    """The official online kNN (§6.1): a class-balanced fraction of train against the
    whole validation split, k nearest by cosine, votes weighted by exp(s/T).

    `labels` (of `train_source`) and `val_source` are read here when not given;
    `labels` may still be being read (`_Background`): the bank is then chosen at the
    first evaluation.
    """

    def __init__(self, config, backbone, train_source, mesh: jax.sharding.Mesh, *,
                 labels=None, val_source=None):
        knn = config.knn
        self._config = config
        self._mesh = mesh
        self._knn = knn
        self._train_source = train_source
        self._labels = eval_input.source_labels(train_source) if labels is None else labels
        self._train_input = None
        if not isinstance(self._labels, _Background):
            self._choose_bank()  # a split without labels fails here, not epochs later
        if val_source is None:
            val_source = sources.make_source(config.data, knn.val_split)
        self._val_input = _eval_input(config, val_source, image_size=knn.image_size,
                                      resize_size=knn.resize_size)
        self._features = jax.jit(lambda variables, images: backbone.apply(
            gathered(variables, mesh), images, train=False))

    def _choose_bank(self):
        labels = self._labels
        if isinstance(labels, _Background):
            labels = self._labels = np.asarray(labels.result(), np.int32)
        if (labels < 0).all():
            raise sources.DataError(f'The {self._config.data.source} train split has no '
                                    'labels; set config.knn.every_epochs=0 to train '
                                    'without kNN.')
        knn = self._knn
        self.num_classes = int(labels.max()) + 1
        indices = (None if knn.train_fraction >= 1 else
                   eval_input.balanced_subset(labels, knn.train_fraction, seed=0))
        self.num_train = len(labels) if indices is None else len(indices)
        self._train_input = _eval_input(self._config, self._train_source, indices=indices,
                                        image_size=knn.image_size,
                                        resize_size=knn.resize_size)

    def __call__(self, state) -> dict[str, float]:
        if self._train_input is None:
            self._choose_bank()
        results = {}
        for weights in ('student', 'teacher'):
            if weights == 'teacher' and state.teacher_params is None:
                continue
            features_fn = functools.partial(self._features, backbone_variables(state, weights))
            accuracy = knn_accuracy(features_fn, self._train_input, self._val_input,
                                    mesh=self._mesh, num_classes=self.num_classes,
                                    k=self._knn.k, temperature=self._knn.temperature)
            results.update({f'knn/{weights}_{name}': value
                            for name, value in accuracy.items()})
        return results


    def pixels(self) -> dict[str, float]:
        """The same kNN on raw pixels (`evaluate --features=pixels`): what the backbone
        must beat."""
        if self._train_input is None:
            self._choose_bank()
        return knn_accuracy(pixel_features(), self._train_input, self._val_input,
                            mesh=self._mesh, num_classes=self.num_classes, k=self._knn.k,
                            temperature=self._knn.temperature)


def pixel_knn(knn: OnlineKnn, config, workdir) -> dict[str, float]:
    """`knn.pixels()` for this run's kNN settings, computed once and kept in
    `WORKDIR/knn_pixels.json` (every process computes; process 0 writes)."""
    settings = {'data': json.loads(config.data.to_json_best_effort()),
                'knn': json.loads(config.knn.to_json_best_effort()),
                'pixels_size': PIXELS_SIZE}
    path = workdir / PIXEL_KNN_FILE
    try:
        cached = json.loads(path.read_text())
        if cached['settings'] == settings:
            return cached['knn']
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = knn.pixels()
    if jax.process_index() == 0:
        path.write_text(json.dumps({'settings': settings, 'knn': result}, indent=2) + '\n')
    return result


def contrastive_crop_boxes(config, backbone, state, source,
                           mesh: jax.sharding.Mesh) -> np.ndarray:
    """Every image's box `[N, 4]` from the teacher's (else the student's) last-block CLS
    attention, on images squashed to `ccrop_image_size` (official §5.2); identical on
    every process."""
    size = config.data.ccrop_image_size
    batches = _eval_input(config, source, image_size=size, resize_size=size, squash=True)
    boxes = ccrop.initial_boxes(len(source))
    # The teacher, or the student when the run has none (as the official box update).
    variables = backbone_variables(
        state, 'student' if state.teacher_params is None else 'teacher')
    model_boxes = jax.jit(lambda variables, images: ccrop.model_boxes(
        backbone, gathered(variables, mesh), images,
        threshold=config.data.ccrop_box_threshold))
    rows = NamedSharding(mesh, P('data'))
    for batch in batches:
        images = jax.make_array_from_process_local_data(rows, batch['image'])
        batch_boxes = model_boxes(variables, normalize_images(images))
        index, valid = (multihost_utils.process_allgather(batch[key], tiled=True)
                        for key in ('index', 'valid'))
        batch_boxes = np.asarray(multihost_utils.process_allgather(batch_boxes, tiled=True))
        boxes[index[valid]] = batch_boxes[valid]  # unreadable images keep the whole image
    return boxes
