"""End-to-end fine-tuning with a classification head: the second task on the loop.

DeiT's recipe (timm's `train.py` as DeiT and the BAM paper's fine-tuning use it), per
config (`configs/finetune_*.py`):

* state: the backbone + a linear head named `head` (timm's ViT name, so the classifier
  exports to `timm.create_model(..., num_classes=N)`), one AdamW over every parameter
  with per-parameter learning-rate scales (`layer_decay`), no weight decay on biases,
  norms, position table and class token (`optimizer.make_finetune_optimizer`), a
  cosine learning rate with linear warm-up (`schedules.cosine_schedule`);
* step: on each device's part of the batch (timm mixes each GPU's batch under DDP),
  normalisation, random erasing (`data.random_erasing`), then mixup / CutMix with label
  smoothing (`data.mixup`), soft-target cross-entropy; drop path inside the backbone;
* input: bicubic random resized crops and flips on the host (`crops.labelled_crop`),
  then RandAugment (`data.randaugment`, timm's rand-m9-mstd0.5-inc1) when configured;
* evaluation at every epoch's end: resize + centre crop (224 of 256, scaled for other
  sizes as `eval_input` does), top-1 / top-5 on the held-out split, logged as
  `eval/top1`, `eval/top5`.

The backbone starts from a pretraining workdir (its teacher by default), an exported
or official file (`export.import_backbone`), or its random initialisation
(`config.init`). Everything else (checkpoints, resume, signals, metrics) is the loop's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax.data import crops as crops_lib
from bam_jax.data import eval_input, mixup as mixup_lib, pipeline, sources
from bam_jax.data import random_erasing as erasing_lib
from bam_jax.data.sources import describe_split
from bam_jax.evaluate.features import normalize_images
from bam_jax.models import multicrop
from bam_jax.models.vit import VisionTransformer
from bam_jax.train.builder import ConfigError
from bam_jax.train.optimizer import make_finetune_optimizer
from bam_jax.train.schedules import cosine_schedule
from bam_jax.train.state import TrainState, gathered, state_sharding
from bam_jax.train.step import CPU_COMPILER_OPTIONS

INIT_SOURCES = ('workdir', 'file', 'random')
# `config.model` keys that do not change the parameters: a pretrained backbone may be
# fine-tuned with other values.
RUN_TIME_MODEL_KEYS = ('drop_path_rate', 'remat', 'attention')
REGULARISE_STREAM = 0x72656775  # folded into the state's rng for mixup and erasing


# ---------------------------------------------------------------------------
# The network: backbone + linear head.
# ---------------------------------------------------------------------------
class Classifier(nn.Module):
    """Images → logits `[N, num_classes]` (float32): the backbone's pooled feature
    (a ViT's CLS token after its final norm) through a linear head named 'head',
    initialised as timm's (truncated normal, std 0.02; zero bias)."""
    backbone: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        features = self.backbone(images, train=train).astype(jnp.float32)
        return nn.Dense(self.num_classes, name='head',
                        kernel_init=nn.initializers.truncated_normal(0.02))(features)


def build_classifier(config, platform: str | None = None) -> Classifier:
    """The fine-tuned network; a ViT's patch projection trains (DeiT), unlike in BAM's
    pretraining. The position table stays the fixed sine-cosine one."""
    backbone = multicrop.build_backbone(config, platform)
    if isinstance(backbone, VisionTransformer):
        backbone = backbone.clone(train_patch_embed=True)
    return Classifier(backbone, config.num_classes)


# ---------------------------------------------------------------------------
# Config checks and the data's classes.
# ---------------------------------------------------------------------------
def data_classes(source) -> int | None:
    """How many classes a train source has, or None when it is unlabelled."""
    if isinstance(source, sources.ImageFolderSource):
        return len(source.classes) or None
    if isinstance(source, sources.SyntheticSource):
        return source.num_classes
    labels = getattr(source, 'labels', None)
    if labels is not None:
        labels = np.asarray(labels)
        return int(labels.max()) + 1 if (labels >= 0).any() else None
    declared = getattr(source, 'num_classes', None)
    return int(declared) if declared else None


def validate_finetune_config(config, device_count: int):
    """The values that would otherwise fail deep inside a step, or that the code cannot
    honour yet, refused with one line naming the key."""
    def need(condition: bool, message: str):
        if not condition:
            raise ConfigError(message)
    need(config.epochs >= 1, f'config.epochs={config.epochs}: train at least one epoch.')
    need(config.batch_size >= 1 and config.batch_size % device_count == 0,
         f'config.batch_size={config.batch_size} is not a positive multiple of the '
         f'{device_count} devices.')
    need(config.optimizer.name == 'adamw',
         f"config.optimizer.name={config.optimizer.name!r}: fine-tuning uses 'adamw'.")
    need(config.optimizer.warmup_epochs >= 0,
         f'config.optimizer.warmup_epochs={config.optimizer.warmup_epochs} must be >= 0.')
    need(config.eval.batch_size % device_count == 0,
         f'config.eval.batch_size={config.eval.batch_size} is not a multiple of the '
         f'{device_count} devices.')
    regularisers = config.regularisers
    if mixup_on(config):
        need((config.batch_size // device_count) % 2 == 0,
             f'config.batch_size={config.batch_size}: mixup pairs the images of each '
             f"device's part ({config.batch_size // device_count}), which must be even.")
        need(regularisers.mixup_mode in mixup_lib.MODES,
             f'config.regularisers.mixup_mode={regularisers.mixup_mode!r}: expected one '
             f'of {list(mixup_lib.MODES)}.')
    need(regularisers.erasing_mode in erasing_lib.MODES,
         f'config.regularisers.erasing_mode={regularisers.erasing_mode!r}: expected one of '
         f'{list(erasing_lib.MODES)}.')
    init = config.init
    need(init.source in INIT_SOURCES,
         f'config.init.source={init.source!r}: expected one of {list(INIT_SOURCES)}.')
    need(init.source != 'workdir' or bool(init.workdir),
         "config.init.source='workdir' needs config.init.workdir=<a pretraining workdir>.")
    need(init.source != 'file' or bool(init.file),
         "config.init.source='file' needs config.init.file=<an exported .safetensors/.pth "
         'or an official BAM checkpoint>.')
    need(init.weights in (None, 'teacher', 'student'),
         f"config.init.weights={init.weights!r}: expected 'teacher' or 'student'.")
    for resolve in (multicrop.compute_dtype, multicrop.attention_implementation):
        try:
            resolve(config, 'cpu')
        except ValueError as error:
            raise ConfigError(str(error)) from None
    _layer_decay_module(config)
    _randaugment(config)
    need(0 <= config.model.get('drop_path_rate', 0.0) < 1,
         f'config.model.drop_path_rate={config.model.get("drop_path_rate")} must be in '
         '[0, 1).')


def mixup_on(config) -> bool:
    regularisers = config.regularisers
    return regularisers.mixup_alpha > 0 or regularisers.cutmix_alpha > 0


def _layer_decay_module(config):
    """`bam_jax.train.layer_decay` when `config.optimizer.layer_decay` is not 1."""
    decay = config.optimizer.layer_decay
    if decay == 1.0:
        return None
    if not 0 < decay <= 1:
        raise ConfigError(f'config.optimizer.layer_decay={decay} must be in (0, 1].')
    from bam_jax.train import layer_decay  # pylint: disable=import-outside-toplevel
    return layer_decay


def _randaugment(config):
    """The host-side RandAugment `config.input.randaugment` names, or None when off."""
    policy = config.input.randaugment
    if not policy:
        return None
    from bam_jax.data import randaugment  # pylint: disable=import-outside-toplevel
    try:
        settings = randaugment.parse(policy)
    except ValueError as error:
        raise ConfigError(f'config.input.randaugment={policy!r}: {error}') from None
    return functools.partial(randaugment.rand_augment, settings=settings)


# ---------------------------------------------------------------------------
# State, optimizer, schedule and step.
# ---------------------------------------------------------------------------
def learning_rate_schedule(config, steps_per_epoch: int):
    """DeiT's: peak `lr × batch_size / lr_batch_base` (its `--lr` per 512 images),
    linear warm-up from `warmup_lr`, cosine to `min_lr`. timm steps it per epoch; here
    per step (the same curve without the staircase)."""
    optimizer = config.optimizer
    total_steps = config.epochs * steps_per_epoch
    peak = optimizer.lr * config.batch_size / optimizer.lr_batch_base
    return cosine_schedule(peak, optimizer.min_lr, total_steps,
                           optimizer.warmup_epochs * steps_per_epoch,
                           warmup_start_value=optimizer.warmup_lr)


def lr_scales(config, params):
    """Per-parameter learning-rate scales (layer decay), or None when every scale is 1."""
    module = _layer_decay_module(config)
    if module is None:
        return None
    return module.layer_decay_scales(params, config.model.to_dict(),
                                     config.optimizer.layer_decay)


@dataclasses.dataclass(frozen=True)
class FineTuning:
    model: Classifier
    tx: optax.GradientTransformation
    learning_rate: Callable
    state: TrainState
    train_step: Callable


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """timm's `SoftTargetCrossEntropy`: mean over images of −Σ targets · log softmax."""
    return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def regulariser_settings(config):
    """(mixup settings or None, random-erasing settings or None) of a config."""
    regularisers = config.regularisers
    mixing = None
    if mixup_on(config):
        mixing = mixup_lib.MixupSettings(
            num_classes=config.num_classes, mixup_alpha=regularisers.mixup_alpha,
            cutmix_alpha=regularisers.cutmix_alpha, prob=regularisers.mixup_prob,
            switch_prob=regularisers.switch_prob, mode=regularisers.mixup_mode,
            label_smoothing=regularisers.label_smoothing)
    erasing = None
    if regularisers.erasing_prob > 0:
        erasing = erasing_lib.ErasingSettings(probability=regularisers.erasing_prob,
                                              mode=regularisers.erasing_mode)
    return mixing, erasing


def make_finetune_step(model: Classifier, tx, learning_rate, config, *,
                       mesh: jax.sharding.Mesh, shardings: TrainState,
                       axis_name: str = 'data', donate: bool = True):
    """The jitted step `(state, batch) -> (state, metrics)` on uint8 'image' `[B, S, S,
    3]` and int32 'label' `[B]` sharded over `axis_name`."""
    mixing, erasing = regulariser_settings(config)
    num_classes, smoothing = config.num_classes, config.regularisers.label_smoothing
    params_sharding = shardings.params

    def regularise(images, labels, key):
        """One device's part: erasing per image (timm's transform), then mixup of the
        part's pairs (timm's collate / loop), else smoothed one-hot targets."""
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        erase_key, mix_key = jax.random.split(key)
        if erasing is not None:
            images = erasing_lib.random_erasing(images, erase_key, erasing)
        if mixing is not None:
            return mixup_lib.mixup(images, labels, mix_key, mixing)
        return images, mixup_lib.smooth_targets(labels, num_classes, smoothing)

    regularise = jax.shard_map(regularise, mesh=mesh,
                               in_specs=(P(axis_name), P(axis_name), P()),
                               out_specs=(P(axis_name), P(axis_name)))

    def train_step(state: TrainState, batch):
        step_rng = jax.random.fold_in(state.rng, state.step)
        images, targets = regularise(normalize_images(batch['image']), batch['label'],
                                     jax.random.fold_in(step_rng, REGULARISE_STREAM))
        dropout_rng = jax.random.fold_in(step_rng, 1)

        def objective(params):
            variables = {'params': gathered(params, mesh), 'batch_stats': state.batch_stats}
            logits, updates = model.apply(variables, images, train=True,
                                          rngs={'dropout': dropout_rng},
                                          mutable=['batch_stats'])
            return soft_target_cross_entropy(logits, targets), updates.get('batch_stats', {})

        (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params)
        grads = jax.lax.with_sharding_constraint(grads, params_sharding)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=batch_stats, opt_state=opt_state)
        metrics = {'loss': loss, 'learning_rate': learning_rate(state.step),
                   'grad_norm': optax.tree.norm(grads),
                   'update_norm': optax.tree.norm(updates),
                   'param_norm': optax.tree.norm(params)}
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    on_cpu = mesh.devices.flat[0].platform == 'cpu'
    return jax.jit(train_step, in_shardings=(shardings, None),
                   out_shardings=(shardings, replicated),
                   donate_argnums=(0,) if donate else (),
                   compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None)


def build_finetuning(config, mesh: jax.sharding.Mesh, steps_per_epoch: int,
                     rng: jax.Array | None = None, *, abstract: bool = False) -> FineTuning:
    """The classifier, optimizer, schedule, state (backbone at its random
    initialisation; `load_initial_backbone` replaces it) and jitted step."""
    model = build_classifier(config, platform=mesh.devices.flat[0].platform)
    learning_rate = learning_rate_schedule(config, steps_per_epoch)
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    init_rng, state_rng = jax.random.split(rng)
    size = config.input.image_size
    shard = config.get('shard_state', False)

    def init_variables():
        return model.init({'params': init_rng, 'dropout': init_rng},
                          jnp.zeros((2, size, size, 3), jnp.float32), train=False)

    abstract_params = jax.eval_shape(init_variables)['params']
    optimizer = config.optimizer
    tx = make_finetune_optimizer(
        learning_rate, optimizer.weight_decay, lr_scales=lr_scales(config, abstract_params),
        clip_grad=optimizer.clip_grad, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps)

    def init():
        variables = init_variables()
        params = variables['params']
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get('batch_stats', {}),
                          teacher_params=None, teacher_batch_stats=None,
                          opt_state=tx.init(params), rng=state_rng)

    shardings = state_sharding(jax.eval_shape(init), mesh, shard=shard)
    init = jax.jit(init, out_shardings=shardings)
    state = jax.eval_shape(init) if abstract else init()
    train_step = make_finetune_step(model, tx, learning_rate, config, mesh=mesh,
                                    shardings=shardings)
    return FineTuning(model, tx, learning_rate, state, train_step)


# ---------------------------------------------------------------------------
# The initial backbone.
# ---------------------------------------------------------------------------
def _architecture(model_config) -> dict[str, Any]:
    return {key: value for key, value in dict(model_config).items()
            if key not in RUN_TIME_MODEL_KEYS}


def _differences(found, wanted) -> str:
    found, wanted = _architecture(found), _architecture(wanted)
    return ', '.join(f'{key}={found.get(key, "(absent)")!r} (config.model.{key}='
                     f'{wanted.get(key, "(absent)")!r})'
                     for key in sorted(found.keys() | wanted.keys())
                     if _as_list(found.get(key)) != _as_list(wanted.get(key)))


def _as_list(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def initial_backbone(config) -> tuple[dict[str, Any] | None, str]:
    """(backbone variables as NumPy, a description) of `config.init`; (None, ...) for a
    random start. Errors name the key and the mismatch (ConfigError)."""
    from bam_jax import export  # pylint: disable=import-outside-toplevel
    from bam_jax.models.timm_names import ArchitectureMismatch  # pylint: disable=import-outside-toplevel
    init = config.init
    if init.source == 'random':
        return None, f'random initialisation (seed {config.seed})'
    if init.source == 'workdir':
        workdir = pathlib.Path(init.workdir)
        try:
            pretrained = export.load_run_config(workdir)
        except export.ExportError as error:
            raise ConfigError(f'config.init.workdir={init.workdir!r}: {error}') from None
        if pretrained.get('task', 'pretrain') != 'pretrain':
            raise ConfigError(f'config.init.workdir={init.workdir!r} is a fine-tuning run, '
                              'not a pretraining one.')
        differences = _differences(pretrained.model, config.model)
        if differences:
            raise ConfigError(
                f'config.init.workdir={init.workdir!r} pretrained another backbone: '
                f'{differences}; pass its values with --config.model.<key>=<value>.')
        try:
            _, state, step = export.restore_state(workdir, init.step)
            weights = init.weights or ('teacher' if state.teacher_params is not None
                                       else 'student')
            variables = export.backbone_variables(state, weights)
        except (export.ExportError, ArchitectureMismatch) as error:
            raise ConfigError(f'config.init.workdir={init.workdir!r}: {error}') from None
        return (jax.tree.map(np.asarray, variables),
                f'the {weights} of {workdir} at step {step}')
    path = pathlib.Path(init.file)
    try:
        variables = export.import_backbone(path, config, weights=init.weights)
    except (export.ExportError, ArchitectureMismatch, ValueError) as error:
        raise ConfigError(f'config.init.file={init.file!r}: {error}') from None
    return variables, f'{path}' + (f' ({init.weights})' if init.weights else '')


def load_initial_backbone(state: TrainState, variables: dict[str, Any]) -> TrainState:
    """`state` with its backbone (params and BN statistics) replaced by `variables`,
    laid out as the state's leaves are (on every process)."""
    def place(new, old):
        new = np.asarray(new, old.dtype)
        if new.shape != old.shape:
            raise ConfigError(f'the initial backbone has a leaf of shape {new.shape} where '
                              f'the config has {old.shape}.')
        return jax.make_array_from_callback(old.shape, old.sharding, lambda index: new[index])

    def placed(new_tree, old_tree, what):
        if jax.tree.structure(new_tree) != jax.tree.structure(old_tree):
            raise ConfigError(f'the initial backbone\'s {what} do not match the config\'s '
                              'model.')
        return jax.tree.map(place, new_tree, old_tree)

    params = dict(state.params)
    params['backbone'] = placed(variables['params'], state.params['backbone'], 'parameters')
    batch_stats = state.batch_stats
    if batch_stats and batch_stats.get('backbone'):
        batch_stats = dict(batch_stats)
        batch_stats['backbone'] = placed(variables['batch_stats'],
                                         state.batch_stats['backbone'], 'BN statistics')
    return state.replace(params=params, batch_stats=batch_stats)


# ---------------------------------------------------------------------------
# Evaluation: top-1 / top-5 on the held-out split.
# ---------------------------------------------------------------------------
class Evaluator:
    """Top-1 and top-5 (%) of the classifier on `source`, resized and centre-cropped."""

    def __init__(self, config, model: Classifier, source, mesh: jax.sharding.Mesh):
        size = config.input.image_size
        self._input = eval_input.make_eval_input(
            source, image_size=size, resize_size=config.eval.get('resize_size'),
            batch_size=config.eval.batch_size // jax.process_count(),
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_workers=config.data.num_workers)
        self._rows = NamedSharding(mesh, P('data'))
        k = min(5, config.num_classes)

        @jax.jit
        def counts(variables, images, labels, valid):
            logits = model.apply(gathered(variables, mesh), normalize_images(images),
                                 train=False)
            top = jax.lax.top_k(logits, k)[1]
            top1 = (top[:, 0] == labels) & valid
            top5 = jnp.any(top == labels[:, None], axis=-1) & valid
            return jnp.stack([top1.sum(), top5.sum(), valid.sum()])

        self._counts = counts

    def __call__(self, state: TrainState) -> dict[str, float]:
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        total = np.zeros(3, np.int64)
        for batch in self._input:
            arrays = [jax.make_array_from_process_local_data(self._rows, batch[key])
                      for key in ('image', 'label', 'valid')]
            total += np.asarray(self._counts(variables, *arrays))
        seen = max(int(total[2]), 1)
        return {'eval/top1': 100.0 * total[0] / seen, 'eval/top5': 100.0 * total[1] / seen}


# ---------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------
class FinetuneTask:
    """Fine-tuning on the loop (see `bam_jax.train.tasks`)."""

    step_inputs = ('image', 'label')
    array_items = ()

    def __init__(self, config, device_count: int):
        validate_finetune_config(config, device_count)
        data = config.data
        self.config = config
        self.train_source = sources.make_source(data)
        classes = data_classes(self.train_source)
        if classes is None:
            raise sources.DataError(f'{describe_split(data, data.split)} has no labels: '
                                    'fine-tuning needs a labelled train split.')
        if config.num_classes is None:
            config.num_classes = classes
        elif config.num_classes != classes:
            raise ConfigError(f'config.num_classes={config.num_classes}, but '
                              f'{describe_split(data, data.split)} has {classes} classes; '
                              f'set config.num_classes={classes}.')
        try:
            self.val_source = sources.make_source(data, data.val_split)
        except sources.DataError as error:
            raise sources.DataError(f'config.data.val_split={data.val_split!r}: '
                                    f'{error}') from None
        val_classes = data_classes(self.val_source)
        if val_classes is None:
            raise sources.DataError(f'config.data.val_split={data.val_split!r}: '
                                    f'{describe_split(data, data.val_split)} has no labels.')
        self._randaugment = _randaugment(config)
        self._evaluate = None

    def build(self, mesh, steps_per_epoch: int, *, initialise: bool):
        """The state and step; a new run's backbone is read (and its architecture
        checked) before anything is compiled. A resumed run needs no initial backbone."""
        variables = None
        if initialise:
            variables, description = initial_backbone(self.config)
        training = build_finetuning(self.config, mesh, steps_per_epoch)
        state = training.state
        if initialise:
            if variables is not None:
                state = load_initial_backbone(state, variables)
            logging.info('Fine-tuning from %s; a %d-class head.', description,
                         self.config.num_classes)
        self._evaluate = Evaluator(self.config, training.model, self.val_source, mesh)
        return state, training.train_step

    def restore_items(self, items):
        del items

    def checkpoint_items(self) -> dict[str, Any]:
        return {}

    def make_input(self, epoch: int):
        del epoch
        config = self.config
        process_count = jax.process_count()
        if config.batch_size % process_count:
            raise sources.DataError(f'batch_size {config.batch_size} is not divisible by '
                                    f'the {process_count} processes.')
        transform = functools.partial(
            crops_lib.labelled_crop, size=config.input.image_size,
            scale=tuple(config.input.scale), flip_prob=config.input.flip_prob,
            randaugment=self._randaugment)
        return pipeline.make_pipeline(
            self.train_source, None, batch_size=config.batch_size // process_count,
            seed=config.seed, process_index=jax.process_index(),
            process_count=process_count, num_workers=config.data.num_workers,
            max_bad_fraction=config.data.max_bad_fraction, transform=transform)

    def end_of_epoch(self, epoch: int, state, progress):
        config = self.config
        every = config.eval.every_epochs
        if not every or ((epoch + 1) % every and epoch + 1 != config.epochs):
            return {}, False
        with progress.timed('eval'):
            return self._evaluate(state), False

    def result(self, evaluation: dict[str, float]) -> dict[str, Any]:
        return {'task': 'finetune', 'labelled': True, **evaluation}

    def finish(self, evaluated_at: int, evaluation: dict[str, float], *, total_steps: int,
               workdir) -> dict[str, float]:
        del total_steps, workdir
        if evaluation:
            logging.info('Top-1 %.2f %%, top-5 %.2f %% on %s at step %d.',
                         evaluation['eval/top1'], evaluation['eval/top5'],
                         describe_split(self.config.data, self.config.data.val_split),
                         evaluated_at)
        return evaluation
