"""Training: schedules, optimizer, train state, step."""

from bam_jax.train.builder import Training, build_training, crop_shapes, frozen_mask
from bam_jax.train.optimizer import make_optimizer
from bam_jax.train.schedules import Schedules, cosine_schedule, make_schedules
from bam_jax.train.state import (TrainState, backbone_variables, count_params,
                                 create_train_state)
from bam_jax.train.step import make_train_step

__all__ = [
    'Schedules', 'TrainState', 'Training', 'build_training', 'cosine_schedule',
    'count_params', 'create_train_state', 'crop_shapes', 'frozen_mask',
    'make_optimizer', 'make_schedules', 'make_train_step',
]
