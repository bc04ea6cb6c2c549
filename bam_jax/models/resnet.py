"""ResNet-50 as the official BAM code builds it, with timm's parameter names.

The official `utils.get_arch` takes any other architecture from timm:
`timm.models.resnet50(num_classes=0)`, the torchvision layout (stride on the 3×3 conv,
1×1 strided projection shortcut) with timm's init, returning the 2048-d global average
of the last stage. Flax names map one-to-one onto timm's keys (`layer1_0/conv1` is
`layer1.0.conv1`, see `torch_layout`).

BatchNorm is PyTorch's: the official code converts every BN to SyncBatchNorm, so the
statistics are over the global batch. Here the step runs under `jit` on a batch sharded
over the 'data' axis, and a mean over the batch axis of that global array is already
global (XLA inserts the all-reduce). The running variance is updated with the unbiased
batch variance, as torch does (flax's own BatchNorm uses the biased one).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bam_jax.models import torch_layout
from bam_jax.models.stochastic_depth import drop_path, linear_rates

# torch BatchNorm defaults: running = (1 − momentum)·running + momentum·batch.
BATCH_NORM_MOMENTUM = 0.1
BATCH_NORM_EPSILON = 1e-5
EXPANSION = 4  # Bottleneck output channels per 3×3 channel
RESNET50_STAGE_DEPTHS = (3, 4, 6, 3)
STEM_WIDTH = 64  # timm's plain 7×7 stem always has 64 channels

# timm `ResNet.init_weights`: kaiming_normal_(mode='fan_out', nonlinearity='relu'), an
# untruncated normal with variance 2 / (out · kh · kw).
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BatchNorm(nn.Module):
    """torch `BatchNorm2d` over the last axis; global-batch statistics under `jit`.

    Training normalises with the biased batch variance and moves the running variance
    toward the unbiased one; evaluation uses the running statistics.

    Attributes:
      scale_init: init of the scale ('weight'); timm zeroes the last BN of each block.
      momentum: torch's momentum (weight of the new batch).
      epsilon: added to the variance.
      dtype: output dtype; statistics are computed in float32.
    """

    scale_init: nn.initializers.Initializer = nn.initializers.ones
    momentum: float = BATCH_NORM_MOMENTUM
    epsilon: float = BATCH_NORM_EPSILON
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param('scale', self.scale_init, (features,))
        bias = self.param('bias', nn.initializers.zeros, (features,))
        running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,))
        running_var = self.variable('batch_stats', 'var', jnp.ones, (features,))
        values = x.astype(jnp.float32)
        if train:
            count = x.size // features
            if count < 2:
                raise ValueError(f'BatchNorm needs more than one value per channel in '
                                 f'training, got input shape {x.shape}.')
            axes = tuple(range(x.ndim - 1))
            mean = values.mean(axes)
            var = jnp.square(values - mean).mean(axes)
            if not self.is_initializing():
                momentum = self.momentum
                running_mean.value = (1 - momentum) * running_mean.value + momentum * mean
                running_var.value = ((1 - momentum) * running_var.value
                                     + momentum * var * (count / (count - 1)))
        else:
            mean, var = running_mean.value, running_var.value
        normed = (values - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return normed.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """Bias-free conv with torch's symmetric `kernel // 2` padding."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=_CONV_INIT, dtype=dtype, name=name)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided) → 1×1 ×4 (dropped per sample at `drop_path_rate` in
    training), plus the (projected) shortcut, then ReLU."""

    planes: int
    stride: int = 1
    project_shortcut: bool = False
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = _conv(self.planes, 1, 1, self.dtype, 'conv1')(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(out, train))
        out = _conv(self.planes, 3, self.stride, self.dtype, 'conv2')(out)
        out = nn.relu(BatchNorm(dtype=self.dtype, name='bn2')(out, train))
        out = _conv(self.planes * EXPANSION, 1, 1, self.dtype, 'conv3')(out)
        # timm's default zero_init_last: each block starts as the identity.
        out = BatchNorm(scale_init=nn.initializers.zeros, dtype=self.dtype,
                        name='bn3')(out, train)
        out = drop_path(self, out, self.drop_path_rate, train)
        shortcut = x
        if self.project_shortcut:
            shortcut = _conv(self.planes * EXPANSION, 1, self.stride, self.dtype,
                             'downsample_0')(x)
            shortcut = BatchNorm(dtype=self.dtype, name='downsample_1')(shortcut, train)
        return nn.relu(out + shortcut)


class ResNet(nn.Module):
    """timm `ResNet` with Bottleneck blocks and no classifier: images → pooled features.

    Attributes:
      stage_depths: blocks per stage; (3, 4, 6, 3) is ResNet-50.
      width: 3×3 channels of the first stage (timm `channels[0]`); stage i has
        width·2^i and outputs 4× that. The stem has 64 channels whatever the width.
      drop_path_rate: stochastic depth of the last block, rising linearly from 0 at
        the first over all blocks (timm's `drop_path_rate`); active with `train=True`
        and a 'dropout' rng.
      dtype: compute dtype; params and BN statistics stay float32.
    """

    stage_depths: Sequence[int] = RESNET50_STAGE_DEPTHS
    width: int = 64
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [N, H, W, C] → global average of the last stage, [N, 32·width]."""
        x = _conv(STEM_WIDTH, 7, 2, self.dtype, 'conv1')(jnp.asarray(images, self.dtype))
        x = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(x, train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        rates = iter(linear_rates(self.drop_path_rate, sum(self.stage_depths)))
        for stage, depth in enumerate(self.stage_depths):
            for index in range(depth):
                x = Bottleneck(self.width * 2 ** stage,
                               stride=2 if stage > 0 and index == 0 else 1,
                               project_shortcut=index == 0, drop_path_rate=next(rates),
                               dtype=self.dtype, name=f'layer{stage + 1}_{index}')(x, train)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------- timm conversion


def timm_model_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """`timm.create_model(**kwargs)` arguments of the same network.

    `model_config` is `config.model` ('name' plus `ResNet` attributes). Non-default
    depths or widths override timm's `resnet50` arguments (`layers`, `channels`), which
    `create_model` accepts.
    """
    attributes = {key: value for key, value in model_config.items() if key != 'name'}
    model = ResNet(**attributes)
    kwargs = {'model_name': 'resnet50', 'num_classes': 0}
    if tuple(model.stage_depths) != RESNET50_STAGE_DEPTHS:
        kwargs['layers'] = tuple(model.stage_depths)
    if model.width != 64:
        kwargs['channels'] = tuple(model.width * 2 ** i
                                   for i in range(len(model.stage_depths)))
    return kwargs


def to_timm(params, batch_stats) -> dict[str, np.ndarray]:
    """The timm `resnet50(num_classes=0)` state dict (loads with `strict=True`), BN
    statistics as `running_mean`/`running_var` plus `num_batches_tracked`."""
    return torch_layout.to_state_dict({'params': params, 'batch_stats': batch_stats})


def from_timm(state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
    """(params, batch_stats) from a timm ResNet state dict, its depths and width read
    from the keys; raises `ArchitectureMismatch` (a ValueError) naming any missing,
    unexpected or misshapen key."""
    for key in ('conv1.weight', 'layer1.0.conv1.weight'):
        if key not in state_dict:
            raise ValueError(f'Not a timm ResNet state dict: no {key!r} key.')
    stage_depths = []
    while any(key.startswith(f'layer{len(stage_depths) + 1}.') for key in state_dict):
        stage = len(stage_depths) + 1
        stage_depths.append(sum(f'layer{stage}.{index}.conv1.weight' in state_dict
                                for index in range(len(state_dict))))
    model = ResNet(stage_depths=tuple(stage_depths),
                   width=int(np.shape(state_dict['layer1.0.conv1.weight'])[0]))
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    variables = torch_layout.from_state_dict(state_dict, expected)
    return variables['params'], variables['batch_stats']
