"""bam-jax: BAM (Balanced Self-Attention Matching) self-supervised pretraining in JAX."""

from bam_jax.loss import bam_loss

__all__ = ['bam_loss']
