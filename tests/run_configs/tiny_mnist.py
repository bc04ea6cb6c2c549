"""The MNIST default shrunk for tests: a 2-block ViT of width 32, one epoch of 62 steps."""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.batch_size = 64
    config.epochs = 1
    config.model.update(embed_dim=32, depth=2, num_heads=2, patch_size=8)
    config.projector.update(hidden_dim=64, out_dim=32)
    config.crops.n_local = 2
    config.optimizer.update(warmup_epochs=0, lr=3e-3)
    config.log_every_steps = 1
    config.checkpoint_every_steps = 10
    config.knn.every_epochs = 1
    return config
