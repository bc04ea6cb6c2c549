"""The MNIST default cut to its first 2 epochs (62 steps), every step logged.

At this point of the default schedule (the end of the learning-rate warm-up) the kNN
of the student is already above that of the same ViT at random initialisation.
"""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.epochs = 2
    config.optimizer.warmup_epochs = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 10
    config.knn.every_epochs = 2
    return config
