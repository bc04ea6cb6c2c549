"""Vision Transformer as pre-trained by BAM, with timm's parameter names.

The module mirrors timm's `VisionTransformer` configured the way the official BAM code
builds it (`weight_init='moco'`, `global_pool='token'`, `num_classes=0`,
`dynamic_img_size=True`), so a trained backbone can be exported to timm by renaming
leaves only: Dense `kernel` [in, out] is torch `weight` [out, in], LayerNorm `scale` is
`weight`, Conv `kernel` [kh, kw, in, out] is `weight` [out, in, kh, kw].

Two parts are frozen at initialisation, as in the official code: the fixed 2-D sin-cos
position table and the patch projection. The forward pass stops their gradients, and
`is_frozen` tells the optimizer which leaves they are.

Attention has two implementations of the same function, chosen per backend by
`bam_jax.models.multicrop.attention_implementation`: the form written out here, tuned for
the CPU ('einsum'), and `jax.nn.dot_product_attention` ('xla', or 'cudnn' for cuDNN's
fused flash attention on GPU).
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bam_jax.models.stochastic_depth import drop_path, linear_rates

LAYER_NORM_EPSILON = 1e-6
# 'einsum': `attention_heads`; 'xla', 'cudnn': `jax.nn.dot_product_attention(...,
# implementation=)`.
ATTENTION_IMPLEMENTATIONS = ('einsum', 'xla', 'cudnn')
# The inputs cuDNN's flash attention takes (before Hopper; Hopper also takes head dim 256).
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128

# Width, depth and heads of the official BAM backbones; BAM's ViT-S uses 12 heads (head
# dim 32), not timm's 6.
VARIANTS = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'small': dict(embed_dim=384, depth=12, num_heads=12),
    'base': dict(embed_dim=768, depth=12, num_heads=12),
}


def is_frozen(path: Sequence[Any]) -> bool:
    """Whether a param path names a leaf that must never be updated.

    Matches at any nesting depth, so it works on the backbone's own params as well as on
    a tree holding the backbone under some prefix. Keys may be strings or the key
    entries of `jax.tree_util.tree_map_with_path` (`DictKey`, `GetAttrKey`).
    """
    keys = tuple(str(getattr(key, 'key', getattr(key, 'name', key))) for key in path)
    if 'pos_embed' in keys:
        return True
    return any(keys[i:i + 2] == ('patch_embed', 'proj') for i in range(len(keys) - 1))


def sincos_pos_embed_2d(grid_size: int, dim: int,
                        temperature: float = 10_000.0) -> np.ndarray:
    """MoCo-v3's fixed 2-D sin-cos position table, with a zero CLS slot in front.

    Patch token k = row * grid_size + col gets
    [sin(row·ω), cos(row·ω), sin(col·ω), cos(col·ω)] with ω_d = temperature^(-d/(dim/4)).
    (MoCo-v3 calls the row coordinate `w`; the numbers are the same.)

    Returns:
      float32 array [1, 1 + grid_size**2, dim].
    """
    if dim % 4:
        raise ValueError(f'The sin-cos table needs dim divisible by 4, got {dim}.')
    quarter = dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.divmod(np.arange(grid_size * grid_size, dtype=np.float64), grid_size)
    row_angles = np.outer(rows, omega)
    col_angles = np.outer(cols, omega)
    patch_table = np.concatenate(
        [np.sin(row_angles), np.cos(row_angles), np.sin(col_angles), np.cos(col_angles)],
        axis=1)
    table = np.concatenate([np.zeros((1, dim)), patch_table], axis=0)
    return table[None].astype(np.float32)


def resize_pos_embed(pos_embed: jax.Array, new_grid_hw: Sequence[int]) -> jax.Array:
    """Resizes a square position table to another patch grid, keeping the CLS slot.

    Same as timm's `resample_abs_pos_embed` (torch bicubic, antialias=True), which the
    official code uses for 96 px local crops: the table is resampled, not recomputed.
    Both use the Keys cubic with a = -0.5 and half-pixel centres.

    Args:
      pos_embed: [B, 1 + g*g, D].
      new_grid_hw: (rows, cols) of the new patch grid.

    Returns:
      [B, 1 + rows*cols, D] in the dtype of `pos_embed`; the input itself if the grid is
      unchanged.
    """
    batch, tokens, dim = pos_embed.shape
    old_grid = math.isqrt(tokens - 1)
    if old_grid * old_grid != tokens - 1:
        raise ValueError(f'Expected 1 + a square number of tokens, got {tokens}.')
    new_rows, new_cols = new_grid_hw
    if (new_rows, new_cols) == (old_grid, old_grid):
        return pos_embed
    patch_grid = pos_embed[:, 1:].reshape(batch, old_grid, old_grid, dim)
    patch_grid = jax.image.resize(patch_grid.astype(jnp.float32),
                                  (batch, new_rows, new_cols, dim),
                                  method='bicubic', antialias=True)
    patch_table = patch_grid.reshape(batch, new_rows * new_cols, dim)
    return jnp.concatenate([pos_embed[:, :1], patch_table.astype(pos_embed.dtype)], axis=1)


def _symmetric_uniform(bound: float) -> nn.initializers.Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _qkv_kernel_init(key, shape, dtype=jnp.float32):
    """timm 'moco' init: Xavier-uniform with q, k and v counted as three D→D maps."""
    fan_in, fan_out = shape[0], shape[1] // 3
    return _symmetric_uniform(math.sqrt(6.0 / (fan_in + fan_out)))(key, shape, dtype)


def _stop_gradient(variables):
    return jax.tree.map(jax.lax.stop_gradient, variables)


class PatchEmbed(nn.Module):
    """Frozen non-overlapping patch projection (timm `patch_embed.proj`)."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        # timm's moco init leaves the conv at PyTorch's default: weight and bias both
        # U(±1/sqrt(fan_in)). The conv never trains, so this init is what it keeps.
        fan_in = images.shape[-1] * self.patch_size ** 2
        init = _symmetric_uniform(1.0 / math.sqrt(fan_in))
        frozen_conv = nn.map_variables(nn.Conv, 'params', trans_in_fn=_stop_gradient,
                                       init=self.is_initializing())
        return frozen_conv(self.embed_dim, (self.patch_size, self.patch_size),
                           strides=(self.patch_size, self.patch_size), padding='VALID',
                           kernel_init=init, bias_init=init, dtype=self.dtype,
                           name='proj')(images)


def exact_gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default (erf) GELU, `x/2 · (1 + erf(x/√2))`.

    Written with `erf` as torch writes it: `jax.nn.gelu(approximate=False)` goes through
    `erfc`, which XLA:CPU lowers about 5× slower, and the two agree to 1 ulp.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2))))


def attention_heads(query: jax.Array, key: jax.Array, value: jax.Array,
                    return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """softmax(q·kᵀ/√d)·v on head-major `[B, H, T, d]`, and the probabilities if asked.

    The scale goes on q (`T·d` products, not `T²`), and without `return_attention` the
    softmax normalisation is applied after the product with v, on `[T, d]` instead of
    `[T, T]`: one pass fewer over the largest tensor, forward and backward. This is
    what XLA's generic `jax.nn.dot_product_attention` does not do (on every backend
    but cuDNN it is the plain softmax form), and it is 1.8× faster on the CPU.
    """
    logits = jnp.einsum('bhqd,bhkd->bhqk', query * query.shape[-1] ** -0.5, key)
    logits_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalised = jnp.exp(logits - logits_max)
    normaliser = jnp.sum(unnormalised, axis=-1, keepdims=True)
    if return_attention:
        attention = unnormalised / normaliser
        return jnp.einsum('bhqk,bhkd->bhqd', attention, value), attention
    return jnp.einsum('bhqk,bhkd->bhqd', unnormalised, value) / normaliser, None


def self_attention(qkv: jax.Array, implementation: str = 'einsum',
                   return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Multi-head attention of the qkv projection `[B, T, 3, H, d]` → `[B, T, H, d]`.

    `implementation` (`ATTENTION_IMPLEMENTATIONS`): 'einsum' is `attention_heads`, the
    CPU's fastest form; 'xla' and 'cudnn' are `jax.nn.dot_product_attention` with that
    implementation, where TPU and GPU compilers fuse their own kernels. 'cudnn' falls back
    to 'xla' for inputs cuDNN's flash attention does not take (float32, head dim not a
    multiple of 8 or above 128).

    `jax.nn.dot_product_attention` does not return the probabilities, so with
    `return_attention` the einsum form computes output and probabilities `[B, H, T, T]`
    whatever the implementation: the attention maps (evaluation, ContrastiveCrop) are
    the same on every backend. The two forms agree to float rounding.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f'attention implementation {implementation!r}: expected one of '
                         f'{list(ATTENTION_IMPLEMENTATIONS)}.')
    if implementation == 'einsum' or return_attention:
        # One transpose makes them head-major [3, B, H, T, d].
        query, key, value = qkv.transpose(2, 0, 3, 1, 4)
        out, attention = attention_heads(query, key, value, return_attention)
        return out.transpose(0, 2, 1, 3), attention
    head_dim = qkv.shape[-1]
    if implementation == 'cudnn' and not (qkv.dtype in CUDNN_DTYPES and head_dim % 8 == 0
                                          and head_dim <= CUDNN_MAX_HEAD_DIM):
        implementation = 'xla'
    query, key, value = (qkv[:, :, index] for index in range(3))
    return jax.nn.dot_product_attention(query, key, value,
                                        implementation=implementation), None


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, ordered like timm's."""

    num_heads: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    attention_implementation: str = 'einsum'

    @nn.compact
    def __call__(self, x: jax.Array,
                 return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
        batch, tokens, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {self.num_heads}.')
        head_dim = dim // self.num_heads
        qkv = nn.Dense(3 * dim, use_bias=self.qkv_bias, kernel_init=_qkv_kernel_init,
                       dtype=self.dtype, name='qkv')(x)
        # Features are [q | k | v] × heads × head_dim, as timm's reshape(B, N, 3, H, hd).
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        out, attention = self_attention(qkv, self.attention_implementation, return_attention)
        out = out.reshape(batch, tokens, dim)
        out = nn.Dense(dim, kernel_init=nn.initializers.xavier_uniform(),
                       dtype=self.dtype, name='proj')(out)
        return out, attention


class Mlp(nn.Module):
    """timm `Mlp`: fc1 → exact GELU → fc2."""

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense_init = nn.initializers.xavier_uniform()
        out_dim = x.shape[-1]
        x = nn.Dense(self.hidden_dim, kernel_init=dense_init, dtype=self.dtype,
                     name='fc1')(x)
        x = exact_gelu(x)
        return nn.Dense(out_dim, kernel_init=dense_init, dtype=self.dtype, name='fc2')(x)


class Block(nn.Module):
    """Pre-norm transformer block with per-sample stochastic depth on both branches."""

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    attention_implementation: str = 'einsum'

    # `train` and `return_attention` are positional so `nn.remat` can mark them static.
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
        dim = x.shape[-1]
        attended, attention = Attention(self.num_heads, self.qkv_bias, self.dtype,
                                        self.attention_implementation,
                                        name='attn')(self._norm('norm1')(x), return_attention)
        x = x + self._drop_path(attended, train)
        mlp = Mlp(int(dim * self.mlp_ratio), self.dtype, name='mlp')
        x = x + self._drop_path(mlp(self._norm('norm2')(x)), train)
        return x, attention

    def _norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name=name)

    def _drop_path(self, branch: jax.Array, train: bool) -> jax.Array:
        return drop_path(self, branch, self.drop_path_rate, train)


class VisionTransformer(nn.Module):
    """timm ViT with CLS-token pooling and no head, as BAM pre-trains it.

    Built in `setup` so `__call__` and `encode` share one set of submodules.

    Attributes:
      patch_size: side of the square patches.
      img_size: image side for which the fixed position table is built
        (img_size // patch_size patches per side); other sizes resample it.
      embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the usual ViT shape.
      drop_path_rate: stochastic depth of the last block, linearly rising from 0 at the
        first (timm's); active with `train=True` and a 'dropout' rng.
      remat: recompute each block in the backward pass (gradient checkpointing).
      dtype: compute dtype; params stay float32.
      attention_implementation: 'einsum' | 'xla' | 'cudnn', see `self_attention`.
    """

    patch_size: int = 16
    img_size: int = 224
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Any = jnp.float32
    attention_implementation: str = 'einsum'

    def setup(self):
        if self.img_size % self.patch_size:
            raise ValueError(f'img_size {self.img_size} is not a multiple of patch_size '
                             f'{self.patch_size}.')
        table = sincos_pos_embed_2d(self.img_size // self.patch_size, self.embed_dim)
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, self.dtype)
        self.cls_token = self.param('cls_token', nn.initializers.normal(1e-6),
                                    (1, 1, self.embed_dim))
        self.pos_embed = self.param('pos_embed', lambda key, shape: jnp.asarray(table),
                                    table.shape)
        # Static: the block's `train` and `return_attention` (self counts as argument 0).
        block = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
        rates = linear_rates(self.drop_path_rate, self.depth)
        self.blocks = [
            block(self.num_heads, self.mlp_ratio, self.qkv_bias, rate, self.dtype,
                  self.attention_implementation)
            for rate in rates
        ]
        self.norm = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype)

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [N, H, W, C] → CLS token after the final norm, [N, embed_dim]."""
        return self.encode(images, train=train)['cls']

    def encode(self, images: jax.Array, *, train: bool = False, n_last_blocks: int = 1,
               return_attention: bool = False) -> dict[str, Any]:
        """Features for evaluation and ContrastiveCrop, from a single forward pass.

        Returns:
          'cls': [N, D], the same as `__call__`.
          'blocks': the last `n_last_blocks` block outputs, oldest first, each through
            the final norm, [N, 1 + P, D] with the CLS token at index 0.
          'attention' (if return_attention): the last block's softmax probabilities,
            [N, heads, 1 + P, 1 + P].
        """
        if not 1 <= n_last_blocks <= self.depth:
            raise ValueError(f'n_last_blocks must be in [1, {self.depth}], '
                             f'got {n_last_blocks}.')
        x = self._embed(images)
        block_outputs = []
        attention = None
        for index, block in enumerate(self.blocks):
            is_last = index == self.depth - 1
            x, block_attention = block(x, train, return_attention and is_last)
            if index >= self.depth - n_last_blocks:
                block_outputs.append(x)
            if is_last:
                attention = block_attention
        normed = [self.norm(output) for output in block_outputs]
        features = {'cls': normed[-1][:, 0], 'blocks': normed}
        if return_attention:
            features['attention'] = attention
        return features

    def _embed(self, images: jax.Array) -> jax.Array:
        """Patch tokens with CLS prepended and the (resampled) fixed table added."""
        _, height, width, _ = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f'Image size {height}x{width} is not a multiple of '
                             f'patch_size {self.patch_size}.')
        patches = self.patch_embed(jnp.asarray(images, self.dtype))
        batch, rows, cols, dim = patches.shape
        patches = patches.reshape(batch, rows * cols, dim)
        cls_token = jnp.broadcast_to(self.cls_token.astype(self.dtype), (batch, 1, dim))
        pos_embed = resize_pos_embed(jax.lax.stop_gradient(self.pos_embed), (rows, cols))
        return jnp.concatenate([cls_token, patches], axis=1) + pos_embed.astype(self.dtype)


def vit(variant: str, **overrides: Any) -> VisionTransformer:
    """Builds a named BAM backbone ('tiny', 'small', 'base'); overrides win."""
    if variant not in VARIANTS:
        raise ValueError(f'Unknown ViT variant {variant!r}; valid: {sorted(VARIANTS)}.')
    return VisionTransformer(**{**VARIANTS[variant], **overrides})
