"""What the loop computes from the backbone between epochs: online kNN and ContrastiveCrop boxes.

Both run the backbone in eval mode over a whole split with the evaluation input
(`bam_jax.data.eval_input`), sharded over the devices of every process.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax.data import ccrop, eval_input, sources
from bam_jax.evaluate import knn_accuracy, normalize_images
from bam_jax.train.state import backbone_variables


def _eval_input(config, source, *, image_size: int, resize_size: int | None,
                indices=None, squash: bool = False) -> eval_input.EvalInput:
    return eval_input.make_eval_input(
        source, image_size=image_size, resize_size=resize_size, indices=indices,
        batch_size=config.knn.batch_size // jax.process_count(), squash=squash,
        process_index=jax.process_index(), process_count=jax.process_count())


class OnlineKnn:
    """The official online kNN (§6.1): a class-balanced fraction of train against the
    whole validation split, k nearest by cosine, votes weighted by exp(s/T)."""

    def __init__(self, config, backbone, train_source, mesh: jax.sharding.Mesh):
        knn = config.knn
        self._mesh = mesh
        self._knn = knn
        labels = eval_input.source_labels(train_source)
        if (labels < 0).all():
            raise sources.DataError(f'The {config.data.source} train split has no labels; '
                                    'set config.knn.every_epochs=0 to train without kNN.')
        self.num_classes = int(labels.max()) + 1
        indices = (None if knn.train_fraction >= 1 else
                   eval_input.balanced_subset(labels, knn.train_fraction, seed=0))
        val_source = sources.make_source(config.data, knn.val_split)
        size = dict(image_size=knn.image_size, resize_size=knn.resize_size)
        self._train_input = _eval_input(config, train_source, indices=indices, **size)
        self._val_input = _eval_input(config, val_source, **size)
        self._features = jax.jit(
            lambda variables, images: backbone.apply(variables, images, train=False))

    def __call__(self, state) -> dict[str, float]:
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
    model_boxes = jax.jit(functools.partial(ccrop.model_boxes, backbone,
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
