"""The student's optimizer: global-norm clipping, then AdamW or LARS, official rules.

* Frozen parameters (the patch projection and the position table) get no update at all,
  not even weight decay: the official code leaves them out of the optimizer.
* Weight decay, and for LARS the trust ratio, apply only to parameters with more than
  one dimension (`utils.get_params_groups`, `utils.LARS`); biases and norm scales are
  exempt; the CLS token `[1, 1, D]` is decayed.
"""

from __future__ import annotations

import jax
import optax

from bam_jax.train.schedules import Schedule

OPTIMIZERS = ('adamw', 'lars')


def decay_mask(params):
    """True for parameters that get weight decay (and LARS adaptation): ndim > 1."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


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
        # Decoupled decay, p ← p − lr·(adam + wd·p), as torch's AdamW.
        inner = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                            weight_decay=weight_decay, mask=decay_mask)
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
