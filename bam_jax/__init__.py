"""bam-jax: BAM (Balanced Self-Attention Matching) self-supervised pretraining in JAX."""

__all__ = ['bam_loss']


def __getattr__(name):
    # Lazy, so that importing a JAX-free submodule (`bam_jax.command_line`, the grain
    # workers' `bam_jax.data.*`) does not import JAX.
    if name == 'bam_loss':
        from bam_jax.loss import bam_loss
        return bam_loss
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
