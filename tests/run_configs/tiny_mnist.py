"""The MNIST default cut to its first 2 epochs (62 steps), every step logged: the run
config of tests that need the default's network and data on a short schedule."""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.epochs = 2
    config.optimizer.warmup_epochs = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 10
    config.knn.every_epochs = 2
    return config
