"""Backbone + projector over all crops (official `MultiCropWrapper`).

The backbone runs once per crop resolution on all crops of that resolution; the
projector runs once on every crop together, so BatchNorm statistics (when the projector
has BN) cover all crops of the global batch, as in the official code.

Crops arrive crop-major, `[n_crops_of_size, B, H, W, C]`, sharded on the image axis
`B`. They are made image-major (`[B·n, H, W, C]`) before the backbone, so each device's
rows stay on that device: the transposes here never move data between devices.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bam_jax.models.caformer import CAFormer
from bam_jax.models.projector import ProjectionHead
from bam_jax.models.resnet import ResNet
from bam_jax.models.vit import vit

# `config.model.name` → the backbone class; 'vit' goes through `vit(variant)`.
BACKBONES = {'resnet50': ResNet, 'caformer_m36': CAFormer}
COMPUTE_DTYPES = ('auto', 'float32', 'bfloat16')
# Backends whose matrix units run bfloat16 at full rate ('gpu' covers CUDA and ROCm).
BFLOAT16_PLATFORMS = ('tpu', 'gpu', 'cuda', 'rocm')
# `config.model.attention` of a ViT: 'einsum', the form `vit.attention_heads` writes out
# for the CPU; 'dot_product_attention', `jax.nn.dot_product_attention`; 'auto', per backend.
ATTENTIONS = ('auto', 'einsum', 'dot_product_attention')
# Backends on which `jax.nn.dot_product_attention` can call cuDNN's fused attention.
CUDNN_PLATFORMS = ('gpu', 'cuda')


class MultiCropNetwork(nn.Module):
    """`crops` (one array per resolution) -> embeddings `[n_crops, B, out_dim]`."""
    backbone: nn.Module
    projector: nn.Module

    def __call__(self, crops: Sequence[jnp.ndarray], *, train: bool = False):
        features = []
        for group in crops:
            n_views, n_images = group.shape[:2]
            images = jnp.swapaxes(group, 0, 1).reshape(n_views * n_images,
                                                        *group.shape[2:])
            group_features = self.backbone(images, train=train)
            features.append(group_features.reshape(n_images, n_views, -1))
        embeddings = self.projector(jnp.concatenate(features, axis=1), train=train)
        return jnp.swapaxes(embeddings, 0, 1)


def compute_dtype(config, platform: str | None = None) -> jnp.dtype:
    """The activations' dtype of `config.compute_dtype`, the one place it is read.

    'auto' is bfloat16 on TPU and GPU, whose matrix units run it at full rate, and
    float32 on the CPU. Parameters, the loss, the Sinkhorn and the optimizer stay float32 in
    every case. `platform` ('cpu', 'gpu', 'tpu', as `Device.platform`) is where the
    network runs; by default JAX's default backend (pass the mesh's when compiling for
    other devices, e.g. a TPU topology from a CPU host).
    """
    name = config.compute_dtype
    if name not in COMPUTE_DTYPES:
        raise ValueError(f'config.compute_dtype={name!r}: expected one of '
                         f'{list(COMPUTE_DTYPES)}.')
    if name == 'auto':
        platform = jax.default_backend() if platform is None else platform
        name = 'bfloat16' if platform in BFLOAT16_PLATFORMS else 'float32'
    return jnp.dtype(name)


def attention_implementation(config, platform: str | None = None) -> str:
    """The ViT's attention of `config.model.attention`, as `vit.ATTENTION_IMPLEMENTATIONS`.

    'auto' is 'einsum' on the CPU, where that form is 1.8× faster than the generic one,
    and `jax.nn.dot_product_attention` on TPU and GPU, whose compilers fuse it: cuDNN's
    flash attention on GPU ('cudnn'; `vit.self_attention` falls back to XLA for float32
    or an unsupported head dim), XLA's own on TPU ('xla'). 'dot_product_attention' is the
    same on every backend, 'einsum' the CPU form everywhere. `platform` as in
    `compute_dtype`. Run configs written before the key existed count as 'auto'.
    """
    name = config.model.get('attention', 'auto')
    if name not in ATTENTIONS:
        raise ValueError(f'config.model.attention={name!r}: expected one of '
                         f'{list(ATTENTIONS)}.')
    platform = jax.default_backend() if platform is None else platform
    if name == 'einsum' or (name == 'auto' and platform == 'cpu'):
        return 'einsum'
    return 'cudnn' if platform in CUDNN_PLATFORMS else 'xla'


def build_backbone(config, platform: str | None = None) -> nn.Module:
    """The backbone of `config.model`: `config.model.name` picks the family ('vit',
    'resnet50', 'caformer_m36'); the other `config.model` keys are the family's
    arguments, e.g. `variant`, `patch_size`. Activations are in `compute_dtype(config,
    platform)`, and a ViT's attention is `attention_implementation(config, platform)`.
    """
    model = dict(config.model)
    name = model.pop('name')
    dtype = compute_dtype(config, platform)
    if name == 'vit':
        model.pop('attention', None)
        return vit(model.pop('variant'), dtype=dtype,
                   attention_implementation=attention_implementation(config, platform),
                   **model)
    if name in BACKBONES:
        return BACKBONES[name](dtype=dtype, **model)
    raise ValueError(f'unknown config.model.name {name!r}; expected one of '
                     f"{['vit', *BACKBONES]}")


def build_network(config, platform: str | None = None) -> MultiCropNetwork:
    """The student (and teacher) network of a run: `build_backbone`'s backbone +
    `config.projector`."""
    backbone = build_backbone(config, platform)
    projector = ProjectionHead(dtype=compute_dtype(config, platform), **config.projector)
    return MultiCropNetwork(backbone=backbone, projector=projector)
