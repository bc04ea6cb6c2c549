"""Evaluation of frozen backbones: features of a split, the official weighted kNN and
linear probe, and `python -m bam_jax.evaluate` (`runner`, `__main__`) for every protocol.

The library modules import nothing of `bam_jax.train` (the training loop imports this
package for its online kNN); only the command's `runner` does, to restore checkpoints.
"""

from bam_jax.evaluate.features import Features, extract_features, normalize_images
from bam_jax.evaluate.knn import KnnResult, knn_accuracy, knn_classify, topk_accuracy

__all__ = ['Features', 'KnnResult', 'extract_features', 'knn_accuracy', 'knn_classify',
           'normalize_images', 'topk_accuracy']
