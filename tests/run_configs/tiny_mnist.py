"""The MNIST default shrunk for tests: a 2-block ViT of width 64, one epoch of 62 steps.

The teacher follows the student closely (momentum 0.9) so that 62 steps show in its kNN.
"""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.batch_size = 64
    config.epochs = 1
    config.model.update(embed_dim=64, depth=2, num_heads=2, patch_size=8)
    config.projector.update(hidden_dim=64, out_dim=32)
    config.crops.n_local = 2
    config.optimizer.update(warmup_epochs=0, lr=5e-3)
    config.teacher_momentum = 0.9
    config.log_every_steps = 1
    config.checkpoint_every_steps = 10
    config.knn.every_epochs = 1
    return config
