"""Transfer by a linear classifier (the paper's Table 5, top): L-BFGS logistic regression.

The protocol of SimCLR, BYOL and Kornblith et al. (2019) that the paper follows: an
L2-regularised multinomial logistic regression on frozen features, fitted to convergence
with L-BFGS (no augmentation, no schedule). The L2 strength λ is chosen among
`num_lambdas` log-spaced values in [1e-6, 1e5] by accuracy on a validation split (carved
class-balanced from train when the data set has none), then the classifier is refitted
with that λ on train + validation and scored on test.

The objective, for rows i with weight w_i ∈ {0, 1} (padding, or rows of another part of
the split, weigh 0) and n = Σ w_i:

    L(W, b) = (1/n) Σ_i w_i · CE(x_i W + b, y_i) + (λ/2) ‖W‖²,

the intercept b unpenalised. scikit-learn's `LogisticRegression(C=...)` minimises
C · Σ_i CE_i + ½‖W‖², the same minimiser when **C = 1 / (n·λ)** (its objective divided by
n·C; scikit-learn itself now optimises that mean form). λ is per example so that one
range fits data sets of any size. With 2 classes this softmax form penalises both
columns, which scikit-learn's binary (one-vector) model does not: it agrees with
scikit-learn from 3 classes on.

Sharding: the rows stay where feature extraction put them, sharded over the 'data'
axis; W and b are replicated. The data term is a per-device sum under `shard_map` and
a `psum`, so the objective and its gradient are the same on any number of devices.
L-BFGS (`optax.lbfgs`, zoom line search) runs in one jitted `lax.while_loop` until the
gradient's norm is at most `tol` or `max_iters`; the sweep goes from the largest λ to the
smallest, each fit warm-started from the previous one.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax.data import eval_input
from bam_jax.evaluate.features import Features

HIGHEST = jax.lax.Precision.HIGHEST


class Fit(NamedTuple):
    """A fitted classifier: `params` {'kernel' [D, C], 'bias' [C]}, the objective at it,
    the L-BFGS iterations taken and the final gradient norm."""
    params: dict[str, jax.Array]
    loss: jax.Array
    iterations: jax.Array
    grad_norm: jax.Array


def lambdas(num: int, low: float = 1e-6, high: float = 1e5) -> np.ndarray:
    """The sweep's λ values, log-spaced, largest first (the warm-start order)."""
    return np.logspace(np.log10(high), np.log10(low), num)


def sklearn_c(l2: float, n: int) -> float:
    """scikit-learn's C for this module's λ on n training rows (module docstring)."""
    return 1.0 / (n * l2)


def shard_rows(features, labels, mesh: jax.sharding.Mesh, axis_name: str = 'data'
               ) -> Features:
    """Host features `[N, D]` and labels `[N]` → `Features` sharded over `axis_name`,
    padded with invalid rows to a multiple of the axis size (what tests and notebooks
    hold; the runner's features are already sharded)."""
    features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)
    pad = -len(labels) % mesh.shape[axis_name]
    rows = NamedSharding(mesh, P(axis_name))
    return Features(jax.device_put(np.pad(features, ((0, pad), (0, 0))), rows),
                    jax.device_put(np.pad(labels, (0, pad), constant_values=-1), rows),
                    jax.device_put(np.arange(len(labels) + pad) < len(labels), rows))


def _logits(params, x):
    return jnp.dot(x, params['kernel'], precision=HIGHEST) + params['bias']


def _sharded_sum(mesh, axis_name, per_row):
    """Σ over rows of `per_row(params, x, y, w)`, per device, then psum'ed."""
    def local(params, x, y, w):
        return jax.lax.psum(jnp.sum(per_row(params, x, y, w)), axis_name)
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(P(), P(axis_name), P(axis_name), P(axis_name)),
                         out_specs=P())


def _cross_entropy(params, x, y, w):
    logits = _logits(params, x)
    picked = jnp.take_along_axis(logits, jnp.maximum(y, 0)[:, None], axis=1)[:, 0]
    return w * (jax.nn.logsumexp(logits, axis=1) - picked)


def _correct(params, x, y, w):
    return w * (jnp.argmax(_logits(params, x), axis=1) == y)


@functools.partial(jax.jit, static_argnames=('mesh', 'axis_name'))
def objective(params, features, labels, weights, l2, *, mesh, axis_name='data'):
    """L(W, b) of the module docstring; `weights` `[N]` 0/1 select the rows."""
    data = _sharded_sum(mesh, axis_name, _cross_entropy)(params, features, labels, weights)
    return data / jnp.sum(weights) + 0.5 * l2 * jnp.sum(jnp.square(params['kernel']))


@functools.partial(jax.jit, static_argnames=('mesh', 'axis_name'))
def _count_correct(params, features, labels, weights, *, mesh, axis_name):
    weights = weights.astype(jnp.float32)
    return (_sharded_sum(mesh, axis_name, _correct)(params, features, labels, weights),
            jnp.sum(weights))


def accuracy(params, features, labels, weights, *, mesh, axis_name='data') -> float:
    """Top-1 (%) over the rows of weight 1."""
    correct, count = _count_correct(params, features, labels, weights, mesh=mesh,
                                    axis_name=axis_name)
    return 100.0 * float(correct) / float(count)


def zeros(dim: int, num_classes: int) -> dict[str, jax.Array]:
    return {'kernel': jnp.zeros((dim, num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}


@functools.partial(jax.jit, static_argnames=('mesh', 'num_classes', 'axis_name'))
def fit(features, labels, weights, l2, *, num_classes: int, mesh, init=None,
        max_iters=1000, tol=1e-4, axis_name='data') -> Fit:
    """Minimises the objective with L-BFGS from `init` (default zeros) → `Fit`.

    `features` `[N, D]`, `labels` `[N]` and `weights` `[N]` are sharded over `axis_name`
    (N divisible by its size); `l2` (λ), `max_iters` and `tol` are traced, so a sweep
    compiles once.
    """
    features = features.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    if init is None:
        init = zeros(features.shape[1], num_classes)
    value_fn = functools.partial(objective, features=features, labels=labels,
                                 weights=weights, l2=l2, mesh=mesh, axis_name=axis_name)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=value_fn)
        return optax.apply_updates(params, updates), state

    def going(carry):
        _, state = carry
        count = otu.tree_get(state, 'count')
        grad_norm = otu.tree_norm(otu.tree_get(state, 'grad'))
        return (count == 0) | ((count < max_iters) & (grad_norm > tol))

    params, state = jax.lax.while_loop(going, step, (init, solver.init(init)))
    return Fit(params, value_fn(params), otu.tree_get(state, 'count'),
               otu.tree_norm(jax.grad(value_fn)(params)))


def validation_mask(labels: np.ndarray, valid: np.ndarray, fraction: float,
                    seed: int) -> np.ndarray:
    """Rows `[N]` of a class-balanced `fraction` of the valid labelled rows
    (`eval_input.balanced_subset`): the validation part carved from train."""
    rows = np.flatnonzero(valid & (labels >= 0))
    mask = np.zeros(len(labels), bool)
    mask[rows[eval_input.balanced_subset(labels[rows], fraction, seed=seed)]] = True
    return mask


def _global_mask(mask: np.ndarray, like: jax.Array) -> jax.Array:
    """A host `[N]` mask (the same on every process) as a global array sharded as `like`."""
    return jax.make_array_from_callback(mask.shape, like.sharding, lambda index: mask[index])


def _concatenate(a: Features, b: Features) -> Features:
    rows = a.features.sharding
    return jax.jit(lambda a, b: jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b),
                   out_shardings=Features(rows, rows, rows))(a, b)


def transfer(train: Features, test: Features, *, mesh: jax.sharding.Mesh,
             num_classes: int, validation: Features | None = None, num_lambdas: int = 45,
             lambda_range: tuple[float, float] = (1e-6, 1e5),
             validation_fraction: float = 0.2, max_iters: int = 1000, tol: float = 1e-4,
             seed: int = 0, axis_name: str = 'data') -> dict[str, Any]:
    """The whole protocol on sharded split features → the JSON numbers.

    Without `validation`, a class-balanced `validation_fraction` of train's rows is held
    out for the sweep. Returns test 'top1' (%), the chosen 'lambda' (and its scikit-learn
    'C' on the refit's rows), the refit's 'loss' and 'iterations', 'validation_top1', and
    'sweep': [{'lambda', 'top1' on validation, 'iterations'}, ...] largest λ first.
    Among equally accurate λ the largest (the simplest classifier) is chosen.
    """
    run = functools.partial(fit, num_classes=num_classes, mesh=mesh, max_iters=max_iters,
                            tol=tol, axis_name=axis_name)
    score = functools.partial(accuracy, mesh=mesh, axis_name=axis_name)

    def usable(split: Features) -> jax.Array:
        return (split.valid & (split.labels >= 0)).astype(jnp.float32)

    if validation is None:
        labels, valid = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                         for x in (train.labels, train.valid))
        held_out = _global_mask(validation_mask(labels, valid, validation_fraction, seed),
                                train.valid)
        fit_rows, val_rows = usable(train) * (1 - held_out), usable(train) * held_out
        val_split, both = train, train
        both_rows = usable(train)
    else:
        fit_rows, val_split, val_rows = usable(train), validation, usable(validation)
        both = _concatenate(train, validation)
        both_rows = usable(both)

    if float(jnp.sum(val_rows)) == 0 or float(jnp.sum(fit_rows)) == 0:
        raise ValueError('logreg: the validation or the training part is empty; use another '
                         'validation_fraction or validation_split.')
    # Zeros, not None, for the first fit: every fit of the sweep is one compiled program.
    sweep, fits, params = [], [], zeros(train.features.shape[1], num_classes)
    for l2 in lambdas(num_lambdas, *lambda_range):
        fitted = run(train.features, train.labels, fit_rows, np.float32(l2), init=params)
        params = fitted.params
        top1 = score(params, val_split.features, val_split.labels, val_rows)
        sweep.append({'lambda': float(l2), 'top1': top1,
                      'iterations': int(fitted.iterations)})
        fits.append(params)
    best = max(range(len(sweep)), key=lambda index: sweep[index]['top1'])  # first: largest λ
    l2 = sweep[best]['lambda']
    final = run(both.features, both.labels, both_rows, np.float32(l2), init=fits[best])
    n = float(jnp.sum(both_rows))
    return {'top1': score(final.params, test.features, test.labels, usable(test)),
            'lambda': l2, 'C': sklearn_c(l2, int(n)), 'validation_top1': sweep[best]['top1'],
            'loss': float(final.loss), 'iterations': int(final.iterations),
            'train_rows': int(n), 'sweep': sweep}
