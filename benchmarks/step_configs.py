"""The configs the step benchmarks time, shared by the JAX step (`train_step.py`) and the
same work in PyTorch (`torch_step.py`), so that both always time the same shapes.

No JAX here: `torch_step.py` runs in a process that never imports it.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from configs import mnist, vit_small_imagenet  # noqa: E402


def vit_small_config():
    """The paper's ViT-S/16 run at 8 images (2 × 224 + 6 × 96 px crops); top-k off (16
    target columns)."""
    config = vit_small_imagenet.get_config()
    config.batch_size = 8
    config.loss.top_k = 0
    return config


def tiny_config():
    """Issue 15's small shapes: the ViT-S recipe at width 192, depth 6 on 32 px images."""
    config = vit_small_imagenet.get_config()
    config.batch_size = 64
    config.compute_dtype = 'float32'
    config.model.update(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3)
    config.projector.update(hidden_dim=1024, out_dim=1024)
    config.crops.update(global_size=32, n_local=4, local_size=16)
    config.loss.top_k = 0
    return config


CONFIGS = {'vit_small': vit_small_config, 'tiny': tiny_config, 'mnist': mnist.get_config}
