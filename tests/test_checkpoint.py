"""Orbax checkpoints: restore onto another device count, retention, atomicity, errors."""

import jax
import numpy as np
import pytest

from bam_jax import train as train_lib
from bam_jax.train import checkpoint as checkpoint_lib
from conftest import data_mesh
from test_train import leaves_with_paths, place, random_batch, tiny_config


@pytest.fixture(scope='module')
def trained_on_eight_devices():
    """A tiny model after 2 steps on 8 devices, and its next step's batch and loss."""
    config = tiny_config()
    mesh = data_mesh(8)
    training = train_lib.build_training(config, mesh, steps_per_epoch=5)
    state = training.state
    for step in range(2):
        state, _ = training.train_step(state, place(random_batch(config, step), mesh))
    saved = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input
    _, metrics = training.train_step(state, place(random_batch(config, 2), mesh))
    return config, saved, float(metrics['loss'])


def test_restore_onto_fewer_devices_continues_identically(tmp_path,
                                                          trained_on_eight_devices):
    config, state, next_loss = trained_on_eight_devices
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, json_items=('data', 'config'))
    checkpointer.save(2, state, data={'epoch': 0, 'position': 32},
                      config=config.to_dict())
    checkpointer.wait_until_finished()

    mesh = data_mesh(1)
    training = train_lib.build_training(config, mesh, steps_per_epoch=5)
    restored, items = checkpoint_lib.Checkpointer(
        tmp_path, json_items=('data', 'config')).restore(
            checkpoint_lib.abstract_like(training.state))
    assert items['data'] == {'epoch': 0, 'position': 32}
    assert items['config']['loss']['top_k'] == config.loss.top_k
    assert int(restored.step) == 2
    assert restored.params['backbone']['norm']['scale'].sharding.mesh.size == 1
    for path, leaf in leaves_with_paths(state).items():
        np.testing.assert_array_equal(leaves_with_paths(restored)[path], leaf,
                                      err_msg=path)
    _, metrics = training.train_step(restored, place(random_batch(config, 2), mesh))
    np.testing.assert_allclose(float(metrics['loss']), next_loss, rtol=1e-6)


def test_retention_interval_and_partial_saves(tmp_path, trained_on_eight_devices):
    _, state, _ = trained_on_eight_devices
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=2,
                                               save_interval_steps=2)
    saved = [checkpointer.save(step, state) for step in range(1, 8)]
    checkpointer.wait_until_finished()
    # The first save of a manager always happens (e.g. right after a resume).
    assert saved == [True, True, False, True, False, True, False]
    assert checkpointer.all_steps() == [4, 6]
    # A save killed before it finished leaves only a temporary directory: it is
    # neither listed nor restored, and the last complete checkpoint still is.
    (tmp_path / '8.orbax-checkpoint-tmp-123').mkdir()
    reopened = checkpoint_lib.Checkpointer(tmp_path)
    assert reopened.latest_step() == 6
    restored, _ = reopened.restore(checkpoint_lib.abstract_like(state, data_mesh(2)))
    assert int(restored.step) == int(state.step)


def test_missing_checkpoints_are_named(tmp_path, trained_on_eight_devices):
    _, state, _ = trained_on_eight_devices
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / 'empty')
    abstract = checkpoint_lib.abstract_like(state, data_mesh(1))
    with pytest.raises(checkpoint_lib.CheckpointError, match='no checkpoint in'):
        checkpointer.restore(abstract)
    checkpointer.save(3, state)
    checkpointer.wait_until_finished()
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=r'no checkpoint for step 5 .*available steps: \[3\]'):
        checkpointer.restore(abstract, step=5)
    wrong = abstract.replace(params={'other': abstract.params['projector']})
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=r'checkpoint .*/3 holds another model or optimizer') as error:
        checkpointer.restore(wrong)
    assert not error.value.corrupt  # never set aside as damaged
