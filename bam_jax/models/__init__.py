"""Backbones and heads for BAM pre-training."""

from bam_jax.models.caformer import CAFormer
from bam_jax.models.projector import ProjectionHead
from bam_jax.models.resnet import ResNet
from bam_jax.models.vit import (VisionTransformer, is_frozen, resize_pos_embed,
                                sincos_pos_embed_2d, vit)

__all__ = [
    'CAFormer',
    'ProjectionHead',
    'ResNet',
    'VisionTransformer',
    'is_frozen',
    'resize_pos_embed',
    'sincos_pos_embed_2d',
    'vit',
]
