"""Backbones and heads for BAM pre-training."""

from bam_jax.models.projector import ProjectionHead
from bam_jax.models.vit import (VisionTransformer, is_frozen, resize_pos_embed,
                                sincos_pos_embed_2d, vit)

__all__ = [
    'ProjectionHead',
    'VisionTransformer',
    'is_frozen',
    'resize_pos_embed',
    'sincos_pos_embed_2d',
    'vit',
]
