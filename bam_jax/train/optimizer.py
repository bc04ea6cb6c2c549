"""The student's optimizer: global-norm clipping, then AdamW or LARS, official rules.

* Frozen parameters (the patch projection and the position table) get no update at all,
  not even weight decay: the official code leaves them out of the optimizer.
* Weight decay, and for LARS the trust ratio, apply only to parameters with more than
  one dimension (`utils.get_params_groups`, `utils.LARS`); biases and norm scales are
  exempt; the CLS token `[1, 1, D]` is decayed.
* Adam's bias corrections 1 − βᵗ are formed without cancellation (torch forms them in
  float64; optax's float32 `1 - β**t` makes early updates up to 1.4e-5 too small).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from bam_jax.train.schedules import Schedule

OPTIMIZERS = ('adamw', 'lars')


def decay_mask(params):
    """True for parameters that get weight decay (and LARS adaptation): ndim > 1."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def bias_correction(decay: float, count: jax.Array) -> jax.Array:
    """1 − decayᶜᵒᵘⁿᵗ as −expm1(count · log decay): within a few float32 ulps at every count."""
    return -jnp.expm1(count.astype(jnp.float32) * math.log(decay))


def scale_by_adam(b1: float = 0.9, b2: float = 0.999,
                  eps: float = 1e-8) -> optax.GradientTransformation:
    """`optax.scale_by_adam` (same state, so checkpoints carry over) with exact 1 − βᵗ."""
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        mu_correction, nu_correction = bias_correction(b1, count), bias_correction(b2, count)
        updates = jax.tree.map(
            lambda m, v: (m / mu_correction) / (jnp.sqrt(v / nu_correction) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(adam.init, update)


def make_optimizer(name: str, learning_rate: Schedule, weight_decay: Schedule, *,
                   frozen, clip_grad: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, lars_momentum: float = 0.9,
                   lars_eta: float = 0.001) -> optax.GradientTransformation:
    """The official optimizer, stepping every schedule with its own update count.

    Args:
      name: 'adamw' (`torch.optim.AdamW` defaults) or 'lars' (`utils.LARS`).
      learning_rate, weight_decay: schedules of the update count (= the train step).
      frozen: a function of the params tree giving a same-shaped tree of bools.
      clip_grad: global-norm clipping over all parameters jointly; 0 disables it.
    """
    if name == 'adamw':
        # Decoupled decay, p ← p − lr·(adam + wd·p), as torch's AdamW; the chain of
        # `optax.adamw`, so its state (and old checkpoints) keep their structure.
        inner = optax.chain(
            scale_by_adam(b1, b2, eps),
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(learning_rate),
        )
    elif name == 'lars':
        # Unlike optax.lars, the learning rate multiplies the momentum buffer, as in
        # `utils.LARS` (μ ← 0.9μ + g; p ← p − lr·μ); the two differ under a schedule.
        inner = optax.chain(
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=lars_eta),
                         decay_mask),
            optax.trace(decay=lars_momentum),
            optax.scale_by_learning_rate(learning_rate),
        )
    else:
        raise ValueError(f'unknown optimizer {name!r}; expected one of {OPTIMIZERS}')

    def labels(params):
        return jax.tree.map(lambda is_frozen: 'frozen' if is_frozen else 'trained',
                            frozen(params))

    return optax.chain(
        optax.clip_by_global_norm(clip_grad) if clip_grad > 0 else optax.identity(),
        optax.multi_transform({'trained': inner, 'frozen': optax.set_to_zero()}, labels),
    )


# ---------------------------------------------------------------------------
# Fine-tuning (DeiT / timm): AdamW over every parameter, per-parameter lr scales.
# ---------------------------------------------------------------------------
# timm's `VisionTransformer.no_weight_decay()`: these and every 1-D parameter (biases,
# norm scales) get no weight decay (`param_groups_weight_decay`).
NO_WEIGHT_DECAY = ('pos_embed', 'cls_token', 'dist_token')


def finetune_decay_mask(params):
    """True for parameters that get weight decay in fine-tuning: more than one
    dimension and not the position table or the class token (timm's rule)."""
    def decayed(path, leaf):
        names = {str(getattr(key, 'key', key)) for key in path}
        return leaf.ndim > 1 and not names & set(NO_WEIGHT_DECAY)
    return jax.tree_util.tree_map_with_path(decayed, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update by its leaf of `scales` (a pytree of floats shaped like the
    params' tree), e.g. layer-wise lr decay. Stateless."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda update, scale: update * scale, updates, scales), state

    return optax.GradientTransformation(init, update)


def make_finetune_optimizer(learning_rate: Schedule, weight_decay: float, *,
                            lr_scales=None, clip_grad: float = 0.0, b1: float = 0.9,
                            b2: float = 0.999,
                            eps: float = 1e-8) -> optax.GradientTransformation:
    """timm's fine-tuning AdamW: clipping (0: off, DeiT's default), Adam, decoupled
    weight decay on `finetune_decay_mask`, each parameter's learning rate times its
    `lr_scales` leaf (None: 1), as torch's AdamW does with a param group's `lr_scale`:
    p ← p − lr·scale·(adam + wd·p)."""
    return optax.chain(
        optax.clip_by_global_norm(clip_grad) if clip_grad > 0 else optax.identity(),
        scale_by_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay, mask=finetune_decay_mask),
        scale_by_tree(lr_scales) if lr_scales is not None else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )
