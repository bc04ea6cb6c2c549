"""Evaluation of frozen backbones: features of a split, and the official weighted kNN.

Nothing here imports `bam_jax.train`; the training loop imports this package for its
online kNN.
"""

from bam_jax.evaluate.features import Features, extract_features, normalize_images
from bam_jax.evaluate.knn import KnnResult, knn_accuracy, knn_classify, topk_accuracy

__all__ = ['Features', 'KnnResult', 'extract_features', 'knn_accuracy', 'knn_classify',
           'normalize_images', 'topk_accuracy']
