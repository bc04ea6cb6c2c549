"""Few-shot classification on frozen features: N-way K-shot episodes.

The protocol of the few-shot and low-label literature: an episode draws `n_way` classes,
then `n_shot` support and `n_query` query examples of each (all distinct); a classifier
built from the support set labels the queries. The score is the mean query accuracy over
`n_episodes` episodes with its 95% confidence half-width, 1.96 · sample std / √episodes.

Features are L2-normalised. Two classifiers:
  'prototype': nearest class mean by cosine similarity (the mean of each class's support
    features, normalised again).
  'logistic': multinomial logistic regression on the support set with an intercept and
    scikit-learn's default penalty (C = 1: ½‖W‖² added to the summed cross-entropy, the
    intercept unpenalised), the classifier commonly fitted on frozen features in the
    few-shot literature. Fitted by Nesterov's accelerated gradient descent with full
    batches, step 1 / L and constant momentum for the condition number κ = L / μ: for
    unit-norm features the mean cross-entropy's curvature is at most ½ · ‖(x, 1)‖² = 1,
    and the penalty gives μ = 1 / (C · support size). The number of steps is fixed by
    the shapes, `LOGISTIC_CONTRACTION` · √κ (the error contracts by about
    e^-LOGISTIC_CONTRACTION; 102 steps for 5-way 5-shot), and there is no line search,
    so every episode is the same program and episodes are vmapped. The fit matches
    scikit-learn's `LogisticRegression()` probabilities to ~1e-7.

Sampling and classification run on the device, vmapped over episodes in chunks
(`lax.map(..., batch_size=...)`) that bound the memory whatever the data set size. The
episodes depend only on the labels and `seed`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bam_jax.evaluate.features import check_features_and_labels
from bam_jax.evaluate.knn import inverse_norms

CLASSIFIERS = ('prototype', 'logistic')
LOGISTIC_C = 1.0
LOGISTIC_CONTRACTION = 20
# Floats held per chunk of episodes (sampling keys, gathered features): 64 MiB.
_CHUNK_FLOATS = 1 << 24


def eligible_classes(labels, n_per_class: int) -> int:
    """How many classes have at least `n_per_class` labelled rows: the most ways an
    episode can have."""
    labels = np.asarray(labels)
    counts = np.unique(labels[labels >= 0], return_counts=True)[1]
    return int((counts >= n_per_class).sum())


def _class_table(labels: np.ndarray, n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each class with at least `n_per_class` of them: `[C, max count]`
    padded with -1, and the counts `[C]`."""
    counts = np.unique(labels, return_counts=True)[1]
    order = np.argsort(labels, kind='stable')  # rows of each class, class by class
    eligible = counts >= n_per_class
    offsets = np.concatenate([[0], np.cumsum(counts)])[:-1][eligible]
    counts = counts[eligible].astype(np.int32)
    width = int(counts.max(initial=1))
    position = np.arange(width)
    table = np.where(position < counts[:, None],
                     order[np.minimum(offsets[:, None] + position, len(order) - 1)], -1)
    return table.astype(np.int32), counts


@functools.partial(jax.jit, static_argnames=('n_way', 'n_per_class', 'n_episodes'))
def _sample(key, table, counts, *, n_way, n_per_class, n_episodes):
    n_classes, max_count = table.shape

    def episode(key):
        class_key, example_key = jax.random.split(key)
        ways = jax.random.permutation(class_key, n_classes)[:n_way]

        def pick(key, members, count):  # n_per_class distinct rows of one class
            scores = jax.random.uniform(key, (max_count,))
            scores = jnp.where(jnp.arange(max_count) < count, scores, -1.0)
            return members[lax.top_k(scores, n_per_class)[1]]

        return jax.vmap(pick)(jax.random.split(example_key, n_way), table[ways],
                              counts[ways])

    batch = max(1, _CHUNK_FLOATS // (n_way * max_count))
    return lax.map(episode, jax.random.split(key, n_episodes), batch_size=batch)


def sample_episodes(labels, *, n_way: int = 5, n_shot: int = 5, n_query: int = 15,
                    n_episodes: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the support `[E, n_way, n_shot]` and query `[E, n_way, n_query]`
    examples of each episode; way w of every episode is one class, and its support and
    query rows are distinct. Classes with fewer than n_shot + n_query rows are skipped."""
    for name, value in (('n_way', n_way), ('n_shot', n_shot), ('n_query', n_query),
                        ('n_episodes', n_episodes)):
        if value < 1:
            raise ValueError(f'{name} must be positive, got {value}.')
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f'labels must be [N], got shape {labels.shape}.')
    table, counts = _class_table(labels, n_shot + n_query)
    if len(counts) < n_way:
        raise ValueError(
            f'{n_way}-way {n_shot}-shot episodes with {n_query} queries need {n_way} '
            f'classes of at least {n_shot + n_query} examples; the labels have '
            f'{len(counts)} such classes (of {len(np.unique(labels))}). Lower n_way, '
            'n_shot or n_query, or use more examples.')
    rows = np.asarray(_sample(jax.random.key(seed), table, counts, n_way=n_way,
                              n_per_class=n_shot + n_query, n_episodes=n_episodes))
    return rows[..., :n_shot], rows[..., n_shot:]


def fit_logistic(x: jax.Array, y: jax.Array, n_classes: int, *, c: float = LOGISTIC_C,
                 steps: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Multinomial logistic regression (W `[D, n_classes]`, b `[n_classes]`) minimising
    Σ cross-entropy + ‖W‖² / (2c) on rows `x` of norm at most 1 (module docstring);
    `steps` defaults to LOGISTIC_CONTRACTION · √κ."""
    n, dim = x.shape
    targets = jax.nn.one_hot(y, n_classes, dtype=x.dtype)
    penalty = 1.0 / (c * n)  # of ½‖W‖² on the mean cross-entropy
    smoothness = 1.0 + penalty
    root_condition = (smoothness / penalty) ** 0.5
    momentum = (root_condition - 1.0) / (root_condition + 1.0)
    if steps is None:
        steps = int(np.ceil(LOGISTIC_CONTRACTION * root_condition))

    def gradient(params):
        weights, bias = params
        residual = (jax.nn.softmax(x @ weights + bias) - targets) / n
        return x.T @ residual + penalty * weights, jnp.sum(residual, axis=0)

    def step(_, state):
        params, previous = state
        look_ahead = jax.tree.map(lambda p, q: p + momentum * (p - q), params, previous)
        updated = jax.tree.map(lambda p, g: p - g / smoothness, look_ahead,
                               gradient(look_ahead))
        return updated, params

    zeros = (jnp.zeros((dim, n_classes), x.dtype), jnp.zeros((n_classes,), x.dtype))
    params, _ = lax.fori_loop(0, steps, step, (zeros, zeros))
    return params


def _episode_accuracy(support, query, *, classifier):
    """Support `[W, S, D]`, query `[W, Q, D]` normalised features → query accuracy."""
    n_way, n_shot, dim = support.shape
    if classifier == 'prototype':
        prototypes = jnp.mean(support, axis=1)
        logits = query @ (prototypes * inverse_norms(prototypes)[:, None]).T
    else:
        weights, bias = fit_logistic(support.reshape(-1, dim),
                                     jnp.repeat(jnp.arange(n_way), n_shot), n_way)
        logits = query @ weights + bias
    return jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(n_way)[:, None])


@functools.partial(jax.jit, static_argnames='classifier')
def _accuracies(features, support_rows, query_rows, *, classifier):
    features = features.astype(jnp.float32) * inverse_norms(features)[:, None]
    rows_per_episode = support_rows[0].size + query_rows[0].size

    def episode(rows):
        support, query = rows
        return _episode_accuracy(features[support], features[query], classifier=classifier)

    batch = max(1, _CHUNK_FLOATS // (rows_per_episode * features.shape[1]))
    with jax.default_matmul_precision('highest'):
        return lax.map(episode, (support_rows, query_rows), batch_size=batch)


def few_shot(features, labels, *, n_way: int = 5, n_shot: int = 5, n_query: int = 15,
             n_episodes: int = 600, classifier: str = 'prototype', seed: int = 0) -> dict:
    """Mean N-way K-shot accuracy over episodes and its 95% confidence half-width.

    Args:
      features: `[N, D]` NumPy or JAX features of valid rows only.
      labels: int `[N]`.
      classifier: 'prototype' or 'logistic' (module docstring).
      seed: of the episodes; the same seed gives the same episodes.

    Returns:
      {'accuracy': %, 'ci95': %}.
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f'Unknown classifier {classifier!r}; valid: {CLASSIFIERS}.')
    check_features_and_labels(features, labels)
    support, query = sample_episodes(labels, n_way=n_way, n_shot=n_shot, n_query=n_query,
                                     n_episodes=n_episodes, seed=seed)
    accuracies = 100.0 * np.asarray(
        _accuracies(jnp.asarray(features), support, query, classifier=classifier),
        np.float64)
    spread = accuracies.std(ddof=1) if n_episodes > 1 else 0.0
    return {'accuracy': float(accuracies.mean()),
            'ci95': float(1.96 * spread / np.sqrt(n_episodes))}
