"""CAFormer-M36 as the official BAM code configures it, with timm's parameter names.

The official `models/metaformer.py` is a copy of timm's MetaFormer, and
`utils.get_arch` builds `caformer_m36(num_classes=0, mlp_act=GELU, act1_layer=GELU,
res_scale_init_values=(None,) * 4)`:

* stem: conv 7×7 / 4, padding 2, with bias → LayerNorm without bias;
* 4 stages of (3, 12, 18, 3) blocks, widths (96, 192, 384, 576); stages 2–4 start with
  LayerNorm (no bias) → conv 3×3 / 2, padding 1, with bias;
* block: `x + mixer(norm1(x))`, then `x + mlp(norm2(x))`; norms are LayerNorm without
  bias, eps 1e-6; no layer-scale, no res-scale, no stochastic depth in pretraining
  (the official `get_arch` does not pass `drop_path_rate`; `drop_path_rate` is there for
  fine-tuning, timm's stage-split linear schedule);
* mixer, stages 1–2: SepConv, 1×1 (×2 channels) → exact GELU → depthwise 7×7 → 1×1,
  no biases; stages 3–4: self-attention over the H·W tokens, head dim 32, no qkv or
  proj bias;
* MLP: 4× expansion, exact GELU, no biases; 1×1 convs in stages 1–2 and Linear in
  stages 3–4 (timm's layout, which decides the shape of the saved weights);
* head: global average → LayerNorm (with bias, eps 1e-6) → 576-d features;
* init: every conv and Linear weight N(0, 0.02) (timm's trunc_normal_ with cut-offs at
  ±2 absolute, i.e. ±100 std), biases 0, norms 1.

52,548,480 parameters. timm's own `caformer_m36(num_classes=0)` has 52,565,862: it uses
StarReLU, with a learnable scalar scale and bias, in the 36 MLPs and 15 SepConvs (102
parameters) and res-scale vectors in stages 3–4 (2 · (18 · 384 + 3 · 576) = 17,280);
the official code replaces both. With `timm_model_kwargs`
timm builds exactly this network, and the names and layouts match one-to-one (flax
`stages_2/blocks_0/token_mixer/qkv` is timm `stages.2.blocks.0.token_mixer.qkv`).

ContrastiveCrop needs an attention map. The official `MetaFormer.get_selfattention`
crashes (bug B7: `self.depth` does not exist) and then would return the attention
block's output rather than its probabilities; its comments show the intent: the
softmax probabilities of the last block of the last (attention) stage, averaged over
the queries, one map per head. `encode(..., return_attention=True)` gives that map.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bam_jax.models import torch_layout
from bam_jax.models.stochastic_depth import drop_path, stage_rates

LAYER_NORM_EPSILON = 1e-6
M36_DEPTHS = (3, 12, 18, 3)
M36_DIMS = (96, 192, 384, 576)
# Token mixer of each stage: 'sepconv' or 'attention' (official CAFormer layout).
TOKEN_MIXERS = ('sepconv', 'sepconv', 'attention', 'attention')

_WEIGHT_INIT = nn.initializers.normal(0.02)


def _gelu(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)  # torch nn.GELU()


def _norm(name: str, dtype: Any, use_bias: bool = False) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, use_bias=use_bias, dtype=dtype,
                        name=name)


def _conv(features: int, kernel: int, dtype: Any, name: str, *, stride: int = 1,
          padding: int = 0, groups: int = 1, use_bias: bool = False) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)),
                   feature_group_count=groups, use_bias=use_bias,
                   kernel_init=_WEIGHT_INIT, dtype=dtype, name=name)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, kernel_init=_WEIGHT_INIT, dtype=dtype,
                    name=name)


class SepConv(nn.Module):
    """MobileNetV2's inverted separable conv: 1×1 up, GELU, depthwise 7×7, 1×1 down."""

    expansion: int = 2
    kernel_size: int = 7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        hidden = self.expansion * dim
        x = _gelu(_conv(hidden, 1, self.dtype, 'pwconv1')(x))
        x = _conv(hidden, self.kernel_size, self.dtype, 'dwconv',
                  padding=self.kernel_size // 2, groups=hidden)(x)
        return _conv(dim, 1, self.dtype, 'pwconv2')(x)


class Attention(nn.Module):
    """Self-attention over the H·W positions; timm's fused qkv layout, no biases."""

    head_dim: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array,
                 return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
        batch, height, width, dim = x.shape
        if dim % self.head_dim:
            raise ValueError(f'Attention width {dim} is not a multiple of head_dim '
                             f'{self.head_dim}.')
        num_heads = dim // self.head_dim
        tokens = x.reshape(batch, height * width, dim)
        qkv = _dense(3 * dim, self.dtype, 'qkv')(tokens)
        # Features are [q | k | v] × heads × head_dim, as timm's reshape(B, N, 3, H, hd).
        qkv = qkv.reshape(batch, height * width, 3, num_heads, self.head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attention = None
        if return_attention:
            logits = jnp.einsum('bqhd,bkhd->bhqk', query, key) * self.head_dim ** -0.5
            attention = jax.nn.softmax(logits, axis=-1)
            out = jnp.einsum('bhqk,bkhd->bqhd', attention, value)
        else:
            out = jax.nn.dot_product_attention(query, key, value)
        out = _dense(dim, self.dtype, 'proj')(out.reshape(batch, height * width, dim))
        return out.reshape(batch, height, width, dim), attention


class Mlp(nn.Module):
    """fc1 (4×) → exact GELU → fc2, no biases; 1×1 convs or Linear as in timm."""

    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        if self.use_conv:
            fc1 = _conv(4 * dim, 1, self.dtype, 'fc1')
            fc2 = _conv(dim, 1, self.dtype, 'fc2')
        else:
            fc1, fc2 = _dense(4 * dim, self.dtype, 'fc1'), _dense(dim, self.dtype, 'fc2')
        return fc2(_gelu(fc1(x)))


class Block(nn.Module):
    """MetaFormer block on [N, H, W, C]: token mixer and MLP, each pre-norm residual
    and dropped per sample at `drop_path_rate` in training."""

    token_mixer: str
    head_dim: int = 32
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    # `train` and `return_attention` are positional so `nn.remat` can mark them static.
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
        normed = _norm('norm1', self.dtype)(x)
        attention = None
        if self.token_mixer == 'attention':
            mixed, attention = Attention(self.head_dim, self.dtype, name='token_mixer')(
                normed, return_attention)
        else:
            mixed = SepConv(dtype=self.dtype, name='token_mixer')(normed)
        x = x + drop_path(self, mixed, self.drop_path_rate, train)
        mlp = Mlp(use_conv=self.token_mixer != 'attention', dtype=self.dtype, name='mlp')
        mixed = mlp(_norm('norm2', self.dtype)(x))
        return x + drop_path(self, mixed, self.drop_path_rate, train), attention


class Stem(nn.Module):
    """Conv 7×7 / 4 (padding 2, bias) → LayerNorm without bias."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = _conv(self.dim, 7, self.dtype, 'conv', stride=4, padding=2, use_bias=True)(
            images)
        return _norm('norm', self.dtype)(x)


class Downsampling(nn.Module):
    """LayerNorm without bias → conv 3×3 / 2 (padding 1, bias)."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _norm('norm', self.dtype)(x)
        return _conv(self.dim, 3, self.dtype, 'conv', stride=2, padding=1,
                     use_bias=True)(x)


class Stage(nn.Module):
    """Optional downsampling, then `depth` blocks; returns the last block's attention."""

    dim: int
    depth: int
    token_mixer: str
    downsampling: bool
    head_dim: int = 32
    drop_path_rates: Sequence[float] | None = None  # one per block; None: all 0
    remat: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        if self.downsampling:
            self.downsample = Downsampling(self.dim, self.dtype)
        # Static: the block's `train` and `return_attention` (self counts as argument 0).
        block = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
        rates = self.drop_path_rates or (0.0,) * self.depth
        self.blocks = [block(self.token_mixer, self.head_dim, rate, self.dtype)
                       for rate in rates]

    def __call__(self, x: jax.Array, train: bool = False,
                 return_attention: bool = False) -> tuple[jax.Array, jax.Array | None]:
        if self.downsampling:
            x = self.downsample(x)
        attention = None
        for index, block in enumerate(self.blocks):
            x, attention = block(x, train, return_attention and index == self.depth - 1)
        return x, attention


class PooledNorm(nn.Module):
    """timm's head without classifier: global average → LayerNorm with bias."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _norm('norm', self.dtype, use_bias=True)(jnp.mean(x, axis=(1, 2)))


class CAFormer(nn.Module):
    """CAFormer backbone: images → pooled features [N, dims[-1]].

    Attributes:
      depths, dims: blocks and width per stage; the defaults are M36.
      head_dim: attention head width (the number of heads is dim // head_dim).
      drop_path_rate: stochastic depth of the last block, rising linearly from 0 over
        all blocks (timm's stage-wise split); active with `train=True` and a 'dropout' rng.
      remat: recompute each block in the backward pass (the official script's
        gradient checkpointing; same numbers).
      dtype: compute dtype; params stay float32.
    """

    depths: Sequence[int] = M36_DEPTHS
    dims: Sequence[int] = M36_DIMS
    head_dim: int = 32
    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        if len(self.depths) != len(TOKEN_MIXERS) or len(self.dims) != len(TOKEN_MIXERS):
            raise ValueError(f'CAFormer needs {len(TOKEN_MIXERS)} depths and dims, got '
                             f'depths {tuple(self.depths)} and dims {tuple(self.dims)}.')
        self.stem = Stem(self.dims[0], self.dtype)
        # As timm: a stage downsamples only when its width changes.
        previous_dims = (self.dims[0],) + tuple(self.dims[:-1])
        self.stages = [
            Stage(dim, depth, mixer, downsampling=dim != previous, head_dim=self.head_dim,
                  drop_path_rates=tuple(rates), remat=self.remat, dtype=self.dtype)
            for dim, depth, mixer, previous, rates in zip(
                self.dims, self.depths, TOKEN_MIXERS, previous_dims,
                stage_rates(self.drop_path_rate, self.depths))
        ]
        self.head = PooledNorm(self.dtype)

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [N, H, W, C] → [N, dims[-1]]; `train` enables drop path."""
        return self.encode(images, train=train)['pooled']

    def encode(self, images: jax.Array, *, train: bool = False,
               return_attention: bool = False) -> dict[str, jax.Array]:
        """Features and, for ContrastiveCrop, the last attention block's maps.

        Returns:
          'pooled': [N, dims[-1]], the same as `__call__`.
          'attention' (if return_attention): the last block's softmax probabilities,
            [N, heads, h·w, h·w] over the last stage's h × w grid.
          'attention_map' (if return_attention): their mean over the queries,
            [N, heads, h, w]: what the official `get_selfattention` meant to return.
        """
        x = self.stem(jnp.asarray(images, self.dtype))
        attention = None
        for index, stage in enumerate(self.stages):
            x, attention = stage(x, train,
                                 return_attention and index == len(self.stages) - 1)
        features = {'pooled': self.head(x)}
        if return_attention:
            batch, height, width, _ = x.shape
            features['attention'] = attention
            features['attention_map'] = attention.mean(axis=2).reshape(
                batch, -1, height, width)
        return features


# ----------------------------------------------------------------- timm conversion


def _model(model_config: Mapping[str, Any]) -> CAFormer:
    return CAFormer(**{key: value for key, value in model_config.items()
                       if key != 'name'})


def timm_model_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The timm constructor and arguments of the same network, as JSON values.

    M36's depths and dims give `timm.create_model(**kwargs)` arguments ('model_name'
    'caformer_m36'). timm registers CAFormers only with fixed depths and dims, so any
    other shape names timm's `MetaFormer` class ('model_class') with `depths`, `dims`
    and CAFormer's mixers and norms. Layers are named, since this module does not
    import torch: activations ('mlp_act', 'act1_layer') for
    `timm.layers.get_act_layer`, and the classes in 'token_mixers' and 'norm_layers'
    from `timm.models.metaformer`.
    """
    model = _model(model_config)
    if model.head_dim != 32:
        raise ValueError(f'timm CAFormers have head_dim 32, got {model.head_dim}.')
    official = {'num_classes': 0, 'mlp_act': 'gelu', 'act1_layer': 'gelu',
                'res_scale_init_values': (None,) * len(TOKEN_MIXERS)}
    if (tuple(model.depths), tuple(model.dims)) == (M36_DEPTHS, M36_DIMS):
        return {'model_name': 'caformer_m36', **official}
    mixer_classes = {'sepconv': 'SepConv', 'attention': 'Attention'}
    # As timm's caformer_*: channels-first norms before SepConv, channels-last before
    # attention.
    norm_classes = {'sepconv': 'LayerNorm2dNoBias', 'attention': 'LayerNormNoBias'}
    return {'model_class': 'MetaFormer', 'depths': tuple(model.depths),
            'dims': tuple(model.dims),
            'token_mixers': tuple(mixer_classes[mixer] for mixer in TOKEN_MIXERS),
            'norm_layers': tuple(norm_classes[mixer] for mixer in TOKEN_MIXERS),
            **official}


def to_timm(params, batch_stats=None) -> dict[str, np.ndarray]:
    """The timm state dict of the official CAFormer (loads with `strict=True`)."""
    del batch_stats  # CAFormer has no BatchNorm
    return torch_layout.to_state_dict({'params': params})


def from_timm(state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
    """(params, {}) from a timm CAFormer state dict, depths and dims read from the keys
    (head_dim 32); raises `ArchitectureMismatch` (a ValueError) naming any missing,
    unexpected or misshapen key. A timm-default `caformer_m36` (StarReLU, res-scale)
    fails on its extra keys."""
    depths, dims = [], []
    for stage in range(len(TOKEN_MIXERS)):
        norm_key = f'stages.{stage}.blocks.0.norm1.weight'
        if norm_key not in state_dict:
            raise ValueError(f'Not a timm CAFormer state dict: no {norm_key!r} key.')
        dims.append(int(np.shape(state_dict[norm_key])[0]))
        depths.append(sum(f'stages.{stage}.blocks.{index}.norm1.weight' in state_dict
                          for index in range(len(state_dict))))
    model = CAFormer(depths=tuple(depths), dims=tuple(dims))
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return torch_layout.from_state_dict(state_dict, expected)['params'], {}
