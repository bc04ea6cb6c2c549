"""The BAM objective: self-attention matching to globally balanced Sinkhorn targets.

Readable beside the paper (Shalam & Korman, ECCV 2024) and the official code, whose
semantics this follows where the two differ (`../shared/docs/bam_reference.md` §1, §8):

* rows are every crop of the local images; columns are only the *target* crops (the
  first `n_target_crops`, i.e. the global ones) of all images on all devices, so the
  matrix is rectangular, never the paper's square `m·n × m·n` one;
* positive masking removes (not zeroes) every view of the row's own image, the row's own
  view included, from the softmax, the Sinkhorn and the cross-entropy;
* the target is `sinkhorn_iters` sweeps of global column / local row normalisation on
  the exp-domain scores, then a final row normalisation (rows exact, columns
  approximate), computed on rows of *all* crops, but only global-crop rows become
  targets;
* optional top-k sparsification of the targets (in every official script, not in the
  paper).

The function takes arrays and numbers only, never a config, so it can be imported into
other training code. Under a mesh it runs per device with `jax.shard_map`: each device
keeps its own images' rows, all-gathers the target columns and `psum`s the Sinkhorn
column sums, so no device holds the full matrix or another device's rows.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

# The official code fills masked logits with finfo.min rather than -inf, so that the
# masked log-probabilities stay finite and 0 · log q is 0, not NaN.
_MASKED_LOGIT = float(jnp.finfo(jnp.float32).min)


# ---------------------------------------------------------------------------
# Collectives that degrade to the identity when there is no mesh axis.
# ---------------------------------------------------------------------------
def _psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def _pmean(x, axis_name):
    return x if axis_name is None else lax.pmean(x, axis_name)


def _pmax(x, axis_name):
    return x if axis_name is None else lax.pmax(x, axis_name)


def _all_gather_images(x, axis_name):
    """[crops, b, D] per device -> [crops, devices·b, D], images in global order.

    On a one-device axis the gather is skipped: XLA:CPU would still copy the columns.
    """
    if axis_name is None or lax.axis_size(axis_name) == 1:
        return x
    return lax.all_gather(x, axis_name, axis=1, tiled=True)


def _device_index(axis_name):
    return 0 if axis_name is None else lax.axis_index(axis_name)


# ---------------------------------------------------------------------------
# The pieces of the objective, each on one device's rows.
# ---------------------------------------------------------------------------
def inverse_norm(x, eps: float = 1e-12):
    """`1 / max(‖x‖, eps)` over the last axis, float32, keepdims: `F.normalize`'s divisor."""
    x = x.astype(jnp.float32)
    return 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), eps)


def l2_normalize(x, eps: float = 1e-12):
    """`F.normalize`: x / max(‖x‖, eps), in float32 whatever the input dtype."""
    return x.astype(jnp.float32) * inverse_norm(x, eps)


def positive_mask(n_local_images: int, n_target_crops: int, n_global_images: int,
                  first_image) -> jax.Array:
    """True where a column is a view of the row's own image, `[b, K]`.

    Column `c = m·n_global_images + i` holds target crop `m` of global image `i`;
    local row `s` is global image `first_image + s`. The mask depends only on the
    image, so the same `[b, K]` block serves every crop of the rows.
    """
    image_of_column = jnp.arange(n_target_crops * n_global_images) % n_global_images
    image_of_row = first_image + jnp.arange(n_local_images)
    return image_of_row[:, None] == image_of_column[None, :]


def sinkhorn(similarity, mask, sinkhorn_reg, sinkhorn_iters: int, axis_name=None):
    """Balanced attention targets from similarities `[..., K]` (local rows), no gradient.

    Exp-domain Sinkhorn with the global max subtracted: `sinkhorn_iters` sweeps of
    (column sums over the rows of *all* devices, then per-row normalisation), then a
    final row normalisation. The official marginals, total-sum scaling and `n_masked`
    are uniform constants that the final row normalisation cancels, so they are left
    out. Masked entries are exactly 0. Safe for ε ≳ 0.02 in float32 (entries ≥ e^{-2/ε}).
    """
    scores = lax.stop_gradient(similarity).astype(jnp.float32) / sinkhorn_reg
    scores = jnp.where(mask, -jnp.inf, scores)
    scores_max = _pmax(jnp.max(scores), axis_name)
    plan = jnp.exp(scores - lax.stop_gradient(scores_max))
    row_axes = tuple(range(plan.ndim - 1))

    def sweep(_, plan):
        plan = plan / _psum(jnp.sum(plan, axis=row_axes), axis_name)
        return plan / jnp.sum(plan, axis=-1, keepdims=True)

    plan = lax.fori_loop(0, sinkhorn_iters, sweep, plan)
    return plan / jnp.sum(plan, axis=-1, keepdims=True)


def keep_top_k(targets, top_k: int):
    """Per image, keep the `top_k` columns of its mean target row; renormalise rows.

    `targets` is `[n_global_crops, b, K]`. Ties can only occur among exact zeros (masked
    columns), where the choice does not change the result.
    """
    _, columns = lax.top_k(jnp.mean(targets, axis=0), top_k)            # [b, top_k]
    keep = jnp.zeros(targets.shape[1:], bool).at[
        jnp.arange(targets.shape[1])[:, None], columns].set(True)
    targets = jnp.where(keep, targets, 0.0)
    return targets / jnp.sum(targets, axis=-1, keepdims=True)


def pair_weights(n_global_crops: int, n_crops: int) -> jax.Array:
    """Weight of CE(target view t, source view v), `[n_global_crops, n_crops]`.

    `(1/n_global) Σ_t (1/(n_crops−1)) Σ_{v≠t}`: every global→global and local→global
    pair, never a local target, never a view against itself (unless there is 1 crop).
    """
    if n_crops == 1:
        return jnp.ones((1, 1)) / n_global_crops
    off_diagonal = 1.0 - jnp.eye(n_global_crops, n_crops)
    return off_diagonal / (n_global_crops * (n_crops - 1))


def _entropy(probs, log_probs):
    """Mean entropy of distributions over the last axis (0 · log 0 counted as 0)."""
    return jnp.mean(-jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1))


def _embedding_std(z, n_rows_global, axis_name):
    """Std over all rows of every normalised dimension, averaged: ~1/√D, 0 at collapse."""
    z = z.reshape(-1, z.shape[-1])
    mean = _psum(jnp.sum(z, axis=0), axis_name) / n_rows_global
    var = _psum(jnp.sum(jnp.square(z - mean), axis=0), axis_name) / n_rows_global
    return jnp.mean(jnp.sqrt(var))


def _bam_per_device(student, teacher, sinkhorn_reg, temperature, *, axis_name,
                    n_global_crops, n_target_crops, sinkhorn_iters, top_k,
                    positive_masking, precision):
    """The objective on one device's images: student `[n_crops, b, D]`."""
    n_crops, n_local_images, _ = student.shape
    student = student.astype(jnp.float32)
    target_side = student if teacher is None else lax.stop_gradient(teacher)

    # Columns: the target crops of all images on all devices, crop-major. Without a
    # teacher they are the student's own and the gradient flows through the gather.
    columns = _all_gather_images(l2_normalize(target_side[:n_target_crops]), axis_name)
    n_global_images = columns.shape[1]
    columns = columns.reshape(n_target_crops * n_global_images, -1)
    if positive_masking:
        mask = positive_mask(n_local_images, n_target_crops, n_global_images,
                             _device_index(axis_name) * n_local_images)
    else:
        mask = jnp.zeros((n_local_images, columns.shape[0]), bool)

    # Cosine similarities of the rows to the columns. A row's norm scales its whole row
    # of the product, so the raw rows go into the matmul and the product is scaled:
    # the normalised `[n_crops, b, D]` rows are never written out, forward or backward.
    def similarity_of(rows):
        return (jnp.einsum('vbd,kd->vbk', rows, columns, precision=precision)
                * inverse_norm(rows))

    similarity = similarity_of(student)
    target_similarity = similarity if teacher is None else similarity_of(target_side)

    # Targets: Sinkhorn over the rows of all crops, then only global-crop rows.
    targets = sinkhorn(target_similarity, mask, sinkhorn_reg, sinkhorn_iters,
                       axis_name)[:n_global_crops]
    if top_k > 0:
        targets = keep_top_k(targets, top_k)
    targets = lax.stop_gradient(targets)

    logits = jnp.where(mask, _MASKED_LOGIT, similarity / temperature)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_probs = jnp.where(mask, 0.0, log_probs)  # official `· (1 − mask)`
    # cross_entropy[t, v] = mean over local images of −Σ_c P_t log Q_v.
    cross_entropy = -jnp.einsum('tbk,vbk->tv', targets, log_probs) / n_local_images
    loss = jnp.sum(pair_weights(n_global_crops, n_crops) * cross_entropy)

    source_probs = lax.stop_gradient(jnp.where(mask, 0.0, jnp.exp(log_probs)))
    metrics = {
        'source_entropy': _entropy(source_probs, lax.stop_gradient(log_probs)),
        'target_entropy': _entropy(targets, jnp.log(jnp.where(targets > 0, targets, 1.0))),
    }
    # Every device holds as many images, so the mean over devices is the global mean:
    # the official objective (mean of per-rank losses) does not depend on the split.
    loss, metrics = _pmean((loss, metrics), axis_name)
    metrics['embedding_std'] = _embedding_std(
        l2_normalize(lax.stop_gradient(student)), n_crops * n_global_images, axis_name)
    return loss, metrics, targets


def _context_mesh_has(axis_name) -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and axis_name in mesh.axis_names


def bam_loss(student, teacher=None, *, n_global_crops: int = 2,
             n_target_crops: int | None = None, temperature=0.1, sinkhorn_reg=0.05,
             sinkhorn_iters: int = 3, top_k: int = 0, positive_masking: bool = True,
             mesh: jax.sharding.Mesh | None = None, axis_name: str = 'data',
             precision: Any = lax.Precision.HIGHEST, return_targets: bool = False):
    """The BAM loss on a global batch of embeddings.

    Args:
      student: raw student embeddings `[n_crops, B, D]`: crop `v` of all `B` images,
        crops `0..n_global_crops-1` global. Any float dtype; the loss runs in float32.
      teacher: the teacher's embeddings of the same crops, or None (the target side is
        then the student itself, and gradient also flows through the columns).
      n_global_crops: global crops; only their rows become Sinkhorn targets.
      n_target_crops: crops used as columns (default `n_global_crops`).
      temperature: τ of the source softmax.
      sinkhorn_reg: ε of the Sinkhorn (may be a traced scalar, e.g. a schedule).
      sinkhorn_iters: column/row sweeps; 0 gives the plain row softmax of sim/ε.
      top_k: if > 0, keep only the top-k target columns per image.
      positive_masking: remove every view of the row's own image.
      mesh: a mesh whose `axis_name` shards the image axis `B`. Without one, the mesh set
        by `jax.set_mesh` is used if it has `axis_name`; otherwise one device's maths.
      axis_name: the data-parallel mesh axis.
      precision: of the similarity matmuls (HIGHEST keeps them float32 on TPU too).
      return_targets: also return the targets `[n_global_crops, B, K]`, columns
        ordered crop-major then global image.

    Returns:
      `(loss, metrics)`, or `(loss, metrics, targets)`. `metrics` holds the mean
      entropies of the source softmax rows and of the target rows (the paper's Fig. 3)
      and `embedding_std` of the normalised student embeddings (a collapse sign).
    """
    n_crops, n_images, _ = student.shape
    n_target_crops = n_global_crops if n_target_crops is None else n_target_crops
    if teacher is not None and teacher.shape != student.shape:
        raise ValueError(f'teacher shape {teacher.shape} != student shape {student.shape}')
    if not 0 < n_global_crops <= n_crops or not 0 < n_target_crops <= n_crops:
        raise ValueError(f'need 0 < n_global_crops ({n_global_crops}) and n_target_crops '
                         f'({n_target_crops}) <= n_crops ({n_crops})')
    n_columns = n_target_crops * n_images
    if positive_masking and n_images < 2:
        raise ValueError('positive masking needs at least 2 images in the global batch')
    if top_k > n_columns:
        raise ValueError(f'top_k={top_k} exceeds the {n_columns} target columns')

    per_device = functools.partial(
        _bam_per_device, n_global_crops=n_global_crops, n_target_crops=n_target_crops,
        sinkhorn_iters=sinkhorn_iters, top_k=top_k, positive_masking=positive_masking,
        precision=precision)
    reg = jnp.asarray(sinkhorn_reg, jnp.float32)
    tau = jnp.asarray(temperature, jnp.float32)
    if mesh is None and not _context_mesh_has(axis_name):
        loss, metrics, targets = per_device(student, teacher, reg, tau, axis_name=None)
    else:
        mesh_size = (mesh or jax.sharding.get_abstract_mesh()).shape[axis_name]
        if n_images % mesh_size:
            raise ValueError(f'the {n_images} images do not split over the {mesh_size} '
                             f"devices of mesh axis '{axis_name}'")
        rows = P(None, axis_name, None)
        sharded = jax.shard_map(
            functools.partial(per_device, axis_name=axis_name), mesh=mesh,
            in_specs=(rows, None if teacher is None else rows, P(), P()),
            out_specs=(P(), P(), rows))
        loss, metrics, targets = sharded(student, teacher, reg, tau)
    return (loss, metrics, targets) if return_targets else (loss, metrics)
