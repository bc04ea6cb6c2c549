"""MLP projection head that maps backbone features to the space BAM's loss compares in.

Same as the official `MlpProjHead`. The BAM scripts use it without BatchNorm (3 layers,
4096 wide, GELU). BatchNorm is there for runs without a teacher.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bam_jax.models.vit import exact_gelu

ACTIVATIONS = {
    'gelu': exact_gelu,
    'relu': nn.relu,
}

# PyTorch trunc_normal_(std=0.02) cuts at ±2 in absolute terms, i.e. ±100 std, so it is a
# plain normal in practice. (jax's truncated_normal cuts at ±2 std, which would not be.)
_KERNEL_INIT = nn.initializers.normal(0.02)


class ProjectionHead(nn.Module):
    """`n_layers` Dense layers; BN (optional) and activation between them.

    Layers are named `linear_i` and `bn_i`. Without BN the params map in order onto the
    official `projector.{0,2,4}`.

    Attributes:
      n_layers: number of Dense layers (1: in → out).
      hidden_dim: width of the hidden layers.
      out_dim: width of the output.
      activation: 'gelu' (exact) or 'relu'.
      use_bias: bias on every Dense.
      use_bn: BatchNorm after every hidden Dense.
      last_bn: with use_bn, a non-affine BatchNorm after the final Dense too.
      dtype: compute dtype; params stay float32.
    """

    n_layers: int = 3
    hidden_dim: int = 4096
    out_dim: int = 4096
    activation: str = 'gelu'
    use_bias: bool = True
    use_bn: bool = False
    last_bn: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f'Unknown activation {self.activation!r}; '
                             f'valid: {sorted(ACTIVATIONS)}.')
        if self.n_layers < 1:
            raise ValueError(f'n_layers must be at least 1, got {self.n_layers}.')
        activation = ACTIVATIONS[self.activation]
        for index in range(self.n_layers):
            is_last = index == self.n_layers - 1
            width = self.out_dim if is_last else self.hidden_dim
            x = nn.Dense(width, use_bias=self.use_bias, kernel_init=_KERNEL_INIT,
                         dtype=self.dtype, name=f'linear_{index}')(x)
            if self.use_bn and (self.last_bn or not is_last):
                x = self._batch_norm(index, affine=not is_last, train=train)(x)
            if not is_last:
                x = activation(x)
        return x

    def _batch_norm(self, index: int, *, affine: bool, train: bool) -> nn.BatchNorm:
        # PyTorch BatchNorm1d defaults: momentum 0.1 (flax counts the other way), eps 1e-5.
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            use_scale=affine, use_bias=affine, dtype=self.dtype,
                            name=f'bn_{index}')
