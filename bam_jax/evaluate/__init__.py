"""Evaluation of frozen backbones: features of a split, the official weighted kNN and
linear probe, and `python -m bam_jax.evaluate` (`runner`, `__main__`) for every protocol.

The library modules import nothing of `bam_jax.train` (the training loop imports this
package for its online kNN); only the command's `runner` does, to restore checkpoints.
The names below are imported when first used, so `--help` does not import JAX.
"""

import importlib

_MODULES = {'Features': 'features', 'extract_features': 'features',
            'normalize_images': 'features', 'KnnResult': 'knn', 'knn_accuracy': 'knn',
            'knn_classify': 'knn', 'topk_accuracy': 'knn'}
__all__ = sorted(_MODULES)


def __getattr__(name):
    if name in _MODULES:
        return getattr(importlib.import_module(f'{__name__}.{_MODULES[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
