"""Every evaluation protocol on one set of frozen features, for `python -m bam_jax.evaluate`.

The protocol settings are `configs/evaluate.py`'s, then the run config's `evaluation`
section (`configs/mnist.py` holds the linear-probe settings that suit its digits), then
the command line's `--config.<key>` overrides (`protocol_config`).

The features come from a training checkpoint (`export.restore_state`), an exported or
official backbone file (`export.import_backbone`), the run's architecture at its random
initialisation (the run's own seed: its step-0 backbone), or raw pixels (the evaluation
crops resized to `config.pixels_size` and flattened): the README's baselines.

The train and test splits' features are extracted once, sharded over all devices, and
shared by kNN, the L-BFGS logistic regression, few-shot, retrieval and k-means; the
linear probe runs the backbone on its own augmented crops (`bam_jax.evaluate.linear`).
The logistic regression, few-shot, retrieval, k-means and the attention figures live in
their own modules, imported only when asked for.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import pathlib
import sys
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from bam_jax import export
from bam_jax.data import eval_input, sources
from bam_jax.evaluate import features as features_lib
from bam_jax.evaluate import fewshot as fewshot_lib
from bam_jax.evaluate import knn as knn_lib
from bam_jax.evaluate import linear as linear_lib
from bam_jax.models.multicrop import build_network
from bam_jax.models.vit import VisionTransformer
from bam_jax.train.builder import crop_shapes
from bam_jax.train.state import create_train_state

PROTOCOLS = ('knn', 'linear', 'logreg', 'fewshot', 'retrieval', 'kmeans', 'attention',
             'davis')
# Protocols that write files into a directory beside --out (OUT_STEM.<protocol>/).
FIGURES = ('attention', 'davis')
FEATURES = ('checkpoint', 'random', 'pixels')
# Protocols on the shared (CLS / pooled) features of the two splits.
SHARED = ('knn', 'logreg', 'fewshot', 'retrieval', 'kmeans')


class EvaluationError(ValueError):
    """Bad input to the evaluation; the message names the flag, key or file."""


@dataclasses.dataclass(frozen=True)
class Subject:
    """What is evaluated: a backbone and its variables (None for raw pixels)."""
    kind: str  # one of FEATURES
    backbone: Any
    variables: Any
    description: dict[str, Any]


def parse_protocols(text: str) -> list[str]:
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown or not names:
        raise EvaluationError(f'config.protocols={text!r}: unknown {unknown or "(empty)"}; '
                              f'choose from {",".join(PROTOCOLS)}')
    return list(dict.fromkeys(names))


def _flat(tree, prefix: str = '') -> dict[str, Any]:
    """{'linear.lr': 0.1, ...} of a nested ConfigDict or dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            flat.update(_flat(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def protocol_config(config, run_config, overrides: Mapping[str, Any],
                    config_name: str = 'configs/evaluate.py'
                    ) -> tuple[ml_collections.ConfigDict, str]:
    """The protocol settings: `config` (the --config file with its command-line
    `overrides` applied), with the keys of the run config's `evaluation` section that the
    command line did not override; and one line saying where they came from."""
    config = copy.deepcopy(config)
    settings = _flat(run_config.get('evaluation') or {})
    defaults = _flat(config)

    def overridden(path):
        return any(path == key or path.startswith(f'{key}.') for key in overrides)

    taken = {}
    for path, value in settings.items():
        if path not in defaults:
            raise EvaluationError(f"the run config's evaluation.{path} is not a key of "
                                  f'{config_name}; the file lists the keys')
        if overridden(path):
            continue
        if isinstance(defaults[path], tuple) and isinstance(value, list):  # from JSON
            value = tuple(value)
        try:
            config.update_from_flattened_dict({path: value})
        except TypeError as error:
            raise EvaluationError(f"the run config's evaluation.{path}={value!r}: "
                                  f'{error}') from error
        taken[path] = value
    line = f'settings: {config_name}'
    for origin, values in (("the run config's evaluation section", taken),
                           ('the command line', overrides)):
        if values:
            shown = ', '.join(f'{path}={value!r}' for path, value in values.items())
            line += f', then {origin} ({shown})'
    return config, line


def resolve_data(config, run_config) -> ml_collections.ConfigDict:
    """The evaluation's data settings: `config.data`, unset keys from the run's config."""
    data, knn = config.data, run_config.knn
    defaults = dict(train_split=knn.get('train_split') or run_config.data.split,
                    test_split=knn.val_split,
                    image_size=knn.image_size, resize_size=knn.resize_size,
                    batch_size=knn.batch_size, train_fraction=knn.train_fraction)
    resolved = {key: default if data[key] is None else data[key]
                for key, default in defaults.items()}
    resolved['num_workers'] = data.num_workers
    resolved['k'] = knn.k if config.knn.k is None else config.knn.k
    resolved['temperature'] = (knn.temperature if config.knn.temperature is None
                               else config.knn.temperature)
    return ml_collections.ConfigDict(resolved)


@contextlib.contextmanager
def _stderr_only_on_success():
    """Holds back what is written to `sys.stderr`; on success writes it out, on failure
    leaves `sys.stderr` a sink, so the command's one `error:` line (written to
    `sys.__stderr__`) stays alone: on a corrupt checkpoint tensorstore's reader threads
    still call into orbax's closed event loop and print tracebacks after the
    ExportError that names the file."""
    original, sys.stderr = sys.stderr, io.StringIO()
    yield  # an exception here leaves the sink in place
    held, sys.stderr = sys.stderr, original
    original.write(held.getvalue())


def load_subject(kind: str, run_config, *, workdir: pathlib.Path | None, step: int | None,
                 weights: str | None, backbone_file: pathlib.Path | None) -> Subject:
    """The backbone and variables to evaluate; errors (ExportError, ArchitectureMismatch)
    name the workdir, step, file or architecture."""
    if kind == 'pixels':
        return Subject(kind, None, None, {})
    network = build_network(run_config)
    backbone = network.backbone
    if kind == 'random':  # as `build_training` initialises the run (the optimizer aside)
        mesh = jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,),
                             devices=jax.devices()[:1])
        state = create_train_state(network, optax.identity(),
                                   jax.random.PRNGKey(run_config.seed),
                                   crop_shapes(run_config, 2), teacher=False, mesh=mesh)
        return Subject(kind, backbone, export.backbone_variables(state, 'student'),
                       {'seed': int(run_config.seed)})
    if backbone_file is not None:
        variables = export.import_backbone(backbone_file, run_config, weights=weights)
        return Subject(kind, backbone, variables,
                       {'backbone': str(backbone_file.absolute()), 'weights': weights})
    with _stderr_only_on_success():
        _, state, step = export.restore_state(workdir, step)
    if weights is None:
        weights = 'teacher' if state.teacher_params is not None else 'student'
    return Subject(kind, backbone, export.backbone_variables(state, weights),
                   {'workdir': str(workdir.absolute()), 'step': int(step),
                    'weights': weights})


def host_rows(split: features_lib.Features) -> tuple[np.ndarray, np.ndarray]:
    """The valid, labelled rows of a split's features and labels, on every host."""
    features, labels, valid = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                               for x in split)
    keep = valid & (labels >= 0)
    return features[keep], labels[keep]


class Evaluation:
    """One subject on one run's data: `run(protocols)` → {protocol: numbers}."""

    def __init__(self, config, run_config, subject: Subject, *,
                 log: Callable[[str], None] = print, protocols=PROTOCOLS):
        self.config, self.run_config, self.subject, self.log = (config, run_config,
                                                                 subject, log)
        self.data = resolve_data(config, run_config)
        self.mesh = jax.make_mesh((jax.device_count(),), ('data',),
                                  axis_types=(AxisType.Auto,))
        if subject.variables is not None:
            self.variables = jax.device_put(subject.variables,
                                            NamedSharding(self.mesh, P()))
        self._shared = None
        self.num_classes = None
        if any(name != 'davis' for name in protocols):  # the run's labelled images
            self._open_splits()

    def _open_splits(self):
        config, run_config, data = self.config, self.run_config, self.data
        for name, size in (('data.batch_size', data.batch_size),
                           ('linear.batch_size', config.linear.batch_size)):
            if size % jax.device_count():
                raise EvaluationError(f'config.{name}={size} is not divisible by the '
                                      f'{jax.device_count()} devices')
        fix = ('name labelled splits with --config.data.train_split and '
               '--config.data.test_split, or evaluate the exported backbone on labelled data '
               '(--backbone=FILE --run_config=CONFIG --run_config.data.data_dir=DIR)')
        try:
            self.train_source = sources.make_source(run_config.data, data.train_split)
            self.test_source = sources.make_source(run_config.data, data.test_split)
        except sources.DataError as error:
            raise EvaluationError(f'{error} The evaluation needs labels: {fix}.') from None
        self.train_labels = eval_input.source_labels(self.train_source)
        if (self.train_labels < 0).all():
            raise EvaluationError(f'the {data.train_split} split of {run_config.data.source} '
                                  f'has no labels; {fix}')
        self.num_classes = int(self.train_labels.max()) + 1

    # -- inputs ------------------------------------------------------------------
    def _input(self, source, *, batch_size=None, **kwargs) -> eval_input.EvalInput:
        batch_size = self.data.batch_size if batch_size is None else batch_size
        return eval_input.make_eval_input(
            source, image_size=self.data.image_size, resize_size=self.data.resize_size,
            batch_size=batch_size // jax.process_count(), num_workers=self.data.num_workers,
            process_index=jax.process_index(), process_count=jax.process_count(), **kwargs)

    def _train_indices(self, fraction: float, seed: int = 0):
        if fraction >= 1:
            return None
        return eval_input.balanced_subset(self.train_labels, fraction, seed=seed)

    def _features_fn(self, layout=None) -> Callable[[jax.Array], jax.Array]:
        if self.subject.kind == 'pixels':
            return features_lib.pixel_features(self.config.pixels_size)
        backbone = self.subject.backbone
        apply = layout or (lambda variables, images: backbone.apply(variables, images,
                                                                    train=False))
        return functools.partial(jax.jit(apply), self.variables)

    def _extract(self, features_fn, batches) -> features_lib.Features:
        return features_lib.extract_features(features_fn, batches, mesh=self.mesh)

    def shared_features(self):
        """(train, test) CLS / pooled / pixel features, extracted once."""
        if self._shared is None:
            features_fn = self._features_fn()
            train = self._input(self.train_source,
                                indices=self._train_indices(self.data.train_fraction))
            self._shared = (self._extract(features_fn, train),
                            self._extract(features_fn, self._input(self.test_source)))
        return self._shared

    def _split_rows(self, split: str):
        if split not in ('train', 'test'):
            raise EvaluationError(f"split must be 'train' or 'test', got {split!r}")
        train, test = self.shared_features()
        return host_rows(train if split == 'train' else test)

    # -- protocols ---------------------------------------------------------------
    def knn(self) -> dict[str, Any]:
        train, test = self.shared_features()
        return knn_lib.features_knn_accuracy(
            train, test, mesh=self.mesh, num_classes=self.num_classes, k=self.data.k,
            temperature=self.data.temperature)

    def linear(self) -> dict[str, Any]:
        settings = self.config.linear
        layout = None
        if self.subject.kind != 'pixels':
            layout = linear_lib.feature_layout(
                self.subject.backbone, n_last_blocks=settings.n_last_blocks,
                avgpool=settings.avgpool)
        elif settings.n_last_blocks != 1 or settings.avgpool:
            self.log('linear: raw pixels have no blocks; n_last_blocks and avgpool unused')
        features_fn = self._features_fn(layout)
        test = self._extract(features_fn, self._input(self.test_source))
        indices = self._train_indices(settings.train_fraction)
        indices = np.arange(len(self.train_source)) if indices is None else indices
        if settings.augment:
            def train_batches(epoch):
                order = np.random.default_rng([settings.seed, epoch]).permutation(indices)
                return self._input(self.train_source, batch_size=settings.batch_size,
                                   indices=order, random_crop=(settings.seed, epoch),
                                   crop_scale=tuple(settings.crop_scale),
                                   flip_prob=settings.flip_prob)
        else:
            train = self._extract(features_fn, self._input(self.train_source,
                                                           indices=indices))
            train_batches = linear_lib.feature_batches(train, settings.batch_size,
                                                       seed=settings.seed)
        result = linear_lib.linear_probe(
            features_fn, train_batches, test, mesh=self.mesh, num_classes=self.num_classes,
            epochs=settings.epochs, lr=settings.lr, bn_head=settings.bn_head,
            seed=settings.seed, log=self.log)
        return result.summary()

    def logreg(self) -> dict[str, Any]:
        from bam_jax.evaluate import logreg as logreg_lib
        options = self.config.logreg.to_dict()
        source = self._logreg_validation_source(options.pop('validation_split'))
        validation = (None if source is None
                      else self._extract(self._features_fn(), self._input(source)))
        train, test = self.shared_features()
        options['lambda_range'] = tuple(options['lambda_range'])
        return logreg_lib.transfer(train, test, mesh=self.mesh, num_classes=self.num_classes,
                                   validation=validation, **options)

    def _logreg_validation_source(self, split: str | None):
        """The source of `config.logreg.validation_split`; None: carve it from train."""
        if split is None:
            return None
        try:
            return sources.make_source(self.run_config.data, split)
        except sources.DataError as error:
            raise EvaluationError(f'config.logreg.validation_split: {error}') from None

    def fewshot(self) -> dict[str, Any]:
        options = self.config.fewshot.to_dict()
        features, labels = self._split_rows(options.pop('split'))
        return fewshot_lib.few_shot(features, labels, **options)

    def retrieval(self) -> dict[str, Any]:
        from bam_jax.evaluate.retrieval import recall_at_k
        features, labels = self._split_rows(self.config.retrieval.split)
        return recall_at_k(features, labels, ks=tuple(self.config.retrieval.ks))

    def kmeans(self) -> dict[str, Any]:
        from bam_jax.evaluate.clustering import kmeans_scores
        options = self.config.kmeans.to_dict()
        features, labels = self._split_rows(options.pop('split'))
        return kmeans_scores(features, labels, **options)

    def attention(self, out_dir: pathlib.Path) -> dict[str, Any]:
        from bam_jax.evaluate.attention import save_attention_maps
        count = self.config.attention.num_images
        images = []
        for batch in self._input(self.test_source):
            images.extend(batch['image'][batch['valid']])
            if len(images) >= count:
                break
        variables = jax.device_get(self.subject.variables)
        paths = save_attention_maps(self.subject.backbone, variables,
                                    np.stack(images[:count]), out_dir,
                                    image_size=self.data.image_size)
        return {'images': len(paths), 'files': [path.name for path in paths]}

    def _clamp(self, protocols: list[str]):
        """Settings the backbone or the data cannot give, clamped with one line each:
        the defaults suit ViT-S on ImageNet, not a 2-block ViT, a ResNet or 4 classes."""
        linear = self.config.linear
        if 'linear' in protocols and self.subject.kind != 'pixels':
            blocks = getattr(self.subject.backbone, 'depth', None)
            if not isinstance(self.subject.backbone, VisionTransformer):
                blocks = 1  # one pooled vector
                if linear.avgpool:
                    self.log('linear: a pooled backbone has no patch tokens; avgpool=False')
                    linear.avgpool = False
            if linear.n_last_blocks > blocks:
                self.log(f'linear: n_last_blocks={linear.n_last_blocks} clamped to {blocks}, '
                         f'all that the {type(self.subject.backbone).__name__} gives')
                linear.n_last_blocks = blocks
        if 'fewshot' in protocols:
            fewshot = self.config.fewshot
            if fewshot.split == 'train':  # the rows the shared features hold
                indices = self._train_indices(self.data.train_fraction)
                labels = self.train_labels if indices is None else self.train_labels[indices]
            else:
                labels = eval_input.source_labels(self.test_source)
            classes = fewshot_lib.eligible_classes(labels, fewshot.n_shot + fewshot.n_query)
            if 2 <= classes < fewshot.n_way:
                self.log(f'fewshot: n_way={fewshot.n_way} clamped to {classes}, the classes '
                         f'of the {fewshot.split} split with {fewshot.n_shot} + '
                         f'{fewshot.n_query} examples')
                fewshot.n_way = classes
            elif classes < 2:
                raise EvaluationError(
                    f'fewshot: the {fewshot.split} split has {classes} classes with '
                    f'fewshot.n_shot + fewshot.n_query = {fewshot.n_shot + fewshot.n_query} '
                    'examples, and an episode needs 2; lower --config.fewshot.n_query')

    def davis_videos(self):
        """The DAVIS sequences and the propagation settings, checked (the backbone, the
        data, every annotation) before any work."""
        from bam_jax.evaluate import davis as davis_lib
        settings = self.config.davis
        try:
            if self.subject.kind == 'pixels':
                raise ValueError('raw pixels have no patch tokens')
            davis_lib.check_backbone(self.subject.backbone)
        except ValueError as error:
            raise EvaluationError(f'the davis protocol: {error}') from error
        if jax.process_count() > 1:
            raise EvaluationError('the davis protocol runs in one process (all its devices); '
                                  f'this run has {jax.process_count()}')
        patch_size = self.subject.backbone.patch_size
        n_last_frames = tuple(settings.n_last_frames)
        for name, ok in (('n_last_frames', n_last_frames and min(n_last_frames) >= 1),
                         ('batch_size', settings.batch_size % jax.device_count() == 0),
                         ('short_side', settings.short_side % patch_size == 0),
                         ('long_side_multiple', settings.long_side_multiple % patch_size == 0),
                         ('topk', settings.topk >= 1)):
            if not ok:
                raise EvaluationError(
                    f'config.davis.{name}={settings[name]!r}: n_last_frames must be ≥ 1, '
                    f'topk ≥ 1, batch_size a multiple of the {jax.device_count()} devices, '
                    f'short_side and long_side_multiple multiples of the patch size '
                    f'{patch_size}')
        videos = davis_lib.select_videos(davis_lib.make_source(settings), settings.sequences)
        return videos, davis_lib.Settings(
            n_last_frames=n_last_frames, short_side=settings.short_side,
            long_side_multiple=settings.long_side_multiple,
            size_mask_neighborhood=settings.size_mask_neighborhood, topk=settings.topk,
            temperature=settings.temperature, batch_size=settings.batch_size,
            overlay_sequences=settings.overlay_sequences, patch_size=patch_size)

    def davis(self, out_dir: pathlib.Path, checked) -> dict[str, Any]:
        from bam_jax.evaluate import davis as davis_lib
        videos, settings = checked
        features_fn = davis_lib.frame_features_fn(
            self.subject.backbone, self.variables, mean=tuple(self.config.davis.mean),
            std=tuple(self.config.davis.std), norm=self.config.davis.norm)
        results = davis_lib.evaluate_videos(videos, features_fn, settings, mesh=self.mesh,
                                            out_dir=out_dir, log=self.log)
        for line in davis_lib.table(results):
            self.log(line)
        for run in results['runs']:  # the numbers of the console's table
            for name, value in run['global'].items():
                results[f"{name} n={run['n_last_frames']}"] = 100 * value
        return results

    def check(self, protocols: list[str]):
        """Settings errors before any feature is computed; returns what the checks
        opened (the DAVIS videos)."""
        self._clamp(protocols)
        opened = {}
        if 'davis' in protocols:
            opened['davis'] = self.davis_videos()
        if 'attention' in protocols:
            from bam_jax.evaluate.attention import check_backbone
            try:
                if self.subject.kind == 'pixels':
                    raise ValueError('raw pixels have no attention maps')
                check_backbone(self.subject.backbone)
            except ValueError as error:
                raise EvaluationError(f'the attention protocol: {error}') from error
        if 'logreg' in protocols:
            self._logreg_validation_source(self.config.logreg.validation_split)
        if 'linear' in protocols and self.subject.kind != 'pixels':
            linear_lib.feature_layout(self.subject.backbone,
                                      n_last_blocks=self.config.linear.n_last_blocks,
                                      avgpool=self.config.linear.avgpool)
        return opened

    def run(self, protocols: list[str], out_dirs: Mapping[str, pathlib.Path] = None
            ) -> tuple[dict[str, Any], dict[str, float]]:
        """({protocol: its numbers}, {'features' and each protocol: wall seconds});
        `out_dirs`: the directory of each protocol in FIGURES."""
        out_dirs = out_dirs or {}
        opened = self.check(protocols)
        results, seconds = {}, {}
        if any(name in SHARED for name in protocols):
            start = time.perf_counter()
            jax.block_until_ready(self.shared_features())
            seconds['features'] = time.perf_counter() - start
            self.log(f'features of both splits: {seconds["features"]:.1f} s')
        for name in protocols:
            start = time.perf_counter()
            if name == 'attention':
                results[name] = self.attention(out_dirs[name])
            elif name == 'davis':
                results[name] = self.davis(out_dirs[name], opened[name])
            else:
                results[name] = getattr(self, name)()
            seconds[name] = time.perf_counter() - start
            self.log(f'{name}: {seconds[name]:.1f} s')
        return results, seconds
