"""`config.shard_state`: the train state split over the devices (FSDP) trains exactly as
the replicated one, and checkpoints move between the layouts and device counts."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bam_jax import export
from bam_jax import train as train_lib
from bam_jax.data import sources
from bam_jax.train import checkpoint as checkpoint_lib
from bam_jax.train import loop, online
from bam_jax.train.state import fsdp_sharding
from conftest import data_mesh, finish, start
from test_run import ccrop_config, free_port, losses
from test_train import leaves_with_paths, place, random_batch, tiny_config

# One test worker runs this module, so `runs` is built once.
pytestmark = pytest.mark.xdist_group('sharded_state')

STEPS = 6
SAVED = 2  # the step the checkpoint tests save and restore


def config_for(shard: bool):
    config = tiny_config()
    config.shard_state = shard
    return config


def fc1(params) -> jax.Array:
    """A large leaf: the first block's MLP kernel, [32, 128] in both tiny networks."""
    return params['backbone']['blocks_0']['mlp']['fc1']['kernel']


def device_bytes(state, device) -> int:
    """The bytes of `state` that `device` holds."""
    return sum(shard.data.nbytes for x in jax.tree.leaves(state)
               for shard in x.addressable_shards if shard.device == device)


@pytest.fixture(scope='module')
def runs():
    """{shard: (per-step losses, state after SAVED steps, per-device bytes at the
    start, final state, the step function)} for STEPS steps on 8 devices."""
    mesh = data_mesh(8)
    results = {}
    for shard in (False, True):
        config = config_for(shard)
        training = train_lib.build_training(config, mesh, steps_per_epoch=5)
        state = training.state
        initial_bytes = device_bytes(state, mesh.devices.flat[0])
        step_losses, saved = [], None
        for step in range(STEPS):
            if step == SAVED:
                saved = jax.tree.map(lambda x: x.copy(), state)  # the step donates
            state, metrics = training.train_step(state, place(random_batch(config, step),
                                                              mesh))
            step_losses.append(float(metrics['loss']))
        results[shard] = (np.array(step_losses), saved, initial_bytes, state,
                          training.train_step)
    return results


def test_fsdp_sharding_splits_the_first_divisible_dimension():
    mesh = data_mesh(8)
    specs = {shape: fsdp_sharding(shape, mesh).spec for shape in [
        (384, 1536), (1, 197, 384), (4096, 4096), (3, 1000), (16, 16, 3, 384),
        (384,), (1, 1, 384), (7, 1001), (1536,)]}
    assert specs == {
        (384, 1536): P('data', None),
        (1, 197, 384): P(None, None, 'data'),
        (4096, 4096): P('data', None),
        (3, 1000): P(None, 'data'),
        (16, 16, 3, 384): P('data', None, None, None),
        (384,): P(),  # small: replicated
        (1, 1, 384): P(),
        (7, 1001): P(),  # nothing divides
        (1536,): P('data'),
    }
    assert fsdp_sharding((384, 1536), data_mesh(1)).spec == P()


def test_sharded_steps_equal_replicated_steps(runs):
    replicated, sharded = runs[False][0], runs[True][0]
    np.testing.assert_allclose(sharded, replicated, rtol=1e-6)
    assert len(set(replicated)) == STEPS  # every step changed the loss
    print(f'max relative loss difference, sharded vs replicated on 8 devices: '
          f'{np.max(np.abs(sharded / replicated - 1)):.2e}')
    for shard, (_, _, _, state, train_step) in runs.items():
        assert train_step._cache_size() == 1  # the layout kept: compiled once
        big = fc1(state.params)
        assert big.shape == (32, 128)
        if shard:
            assert big.sharding.spec == P('data', None)
            assert {s.data.shape for s in big.addressable_shards} == {(32 // 8, 128)}
            assert len(big.addressable_shards) == 8
            # The teacher and both AdamW moments are split alike.
            teacher = fc1(state.teacher_params)
            assert teacher.sharding.spec == big.sharding.spec
            moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == (32, 128)]
            assert len(moments) == 2 * 2  # mu and nu of fc1 in 2 blocks
            assert all(x.sharding.spec == big.sharding.spec for x in moments)
        else:
            assert {s.data.shape for s in big.addressable_shards} == {(32, 128)}
        # Small leaves, step and rng are replicated in both layouts.
        norm = state.params['backbone']['norm']['scale']
        assert norm.sharding.spec == P()
        assert state.step.sharding.spec == state.rng.sharding.spec == P()
    # Tiny model: 558,616 bytes per device replicated, 89,112 sharded (measured).
    assert runs[True][2] < runs[False][2] / 6


@pytest.mark.parametrize('saved_layout, n_devices, layout', [
    (True, 4, False), (True, 2, True), (False, 8, True)],
    ids=['sharded8_to_replicated4', 'sharded8_to_sharded2', 'replicated8_to_sharded8'])
def test_checkpoint_restores_across_layouts_and_device_counts(tmp_path, runs, saved_layout,
                                                              n_devices, layout):
    expected_losses, saved, *_ = runs[saved_layout]
    checkpointer = checkpoint_lib.Checkpointer(tmp_path)
    checkpointer.save(SAVED, saved)
    checkpointer.wait_until_finished()

    mesh = data_mesh(n_devices)
    config = config_for(layout)
    training = train_lib.build_training(config, mesh, steps_per_epoch=5)
    restored, _ = checkpoint_lib.Checkpointer(tmp_path).restore(
        checkpoint_lib.abstract_like(training.state))
    assert int(restored.step) == SAVED
    big = fc1(restored.params)
    assert big.sharding.mesh.size == n_devices
    assert {s.data.shape for s in big.addressable_shards} == (
        {(32 // n_devices, 128)} if layout else {(32, 128)})
    restored_leaves = leaves_with_paths(restored)
    for path, value in leaves_with_paths(saved).items():
        np.testing.assert_array_equal(restored_leaves[path], value, err_msg=path)
    state = restored
    for step in range(SAVED, SAVED + 2):  # continues as the uninterrupted run
        state, metrics = training.train_step(state, place(random_batch(config, step), mesh))
        np.testing.assert_allclose(float(metrics['loss']), expected_losses[step], rtol=1e-6)
    assert fc1(state.params).sharding == big.sharding


def test_loop_resumes_a_sharded_run_replicated_with_the_same_boxes_and_knn(tmp_path):
    config = ccrop_config()
    config.shard_state = True
    assert loop.train_and_evaluate(config, str(tmp_path))['step'] == 6
    sharded_losses = losses(tmp_path)

    # The replicated layout resumes the sharded run's step 2 and retraces its losses.
    replicated = config.copy_and_resolve_references()
    replicated.shard_state = False
    loop.train_and_evaluate(replicated, str(tmp_path), from_step=2)  # a run-control key
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(3, 7):
        assert resumed[step] == pytest.approx(sharded_losses[step], rel=1e-6), step

    # ContrastiveCrop boxes and kNN read a sharded state as they read a replicated one.
    mesh = loop.data_mesh()
    source = sources.make_source(config.data)
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / 'checkpoints',
                                               array_items=('boxes',),
                                               json_items=('data', 'config'))
    results = []
    for layout in (config, replicated):
        training = train_lib.build_training(layout, mesh, steps_per_epoch=2)
        state, items = checkpointer.restore(checkpoint_lib.abstract_like(training.state),
                                            step=4)
        assert fc1(state.params).sharding == fc1(training.state.params).sharding
        backbone = training.network.backbone
        boxes = online.contrastive_crop_boxes(layout, backbone, state, source, mesh)
        knn = online.OnlineKnn(layout, backbone, source, mesh)(state)
        results.append((boxes, knn))
    np.testing.assert_array_equal(results[0][0], items['boxes'])
    np.testing.assert_array_equal(results[1][0], items['boxes'])
    assert results[0][1] == results[1][1] and 'knn/teacher_top1' in results[0][1]


def test_two_processes_sharded_equal_one_process_replicated(small_mnist_run, tmp_path):
    workdir = tmp_path / 'run'
    address = f'--coordinator_address=127.0.0.1:{free_port()}'
    processes = [start(workdir, address, '--num_processes=2', f'--process_id={index}',
                       '--config.shard_state=True', devices=2) for index in range(2)]
    assert [finish(process, workdir) for process in processes] == [0, 0]
    sharded, replicated = losses(workdir), losses(small_mnist_run)
    assert sorted(sharded) == sorted(replicated)
    worst = max(abs(sharded[step] / replicated[step] - 1) for step in replicated)
    print(f'max relative loss difference, 2×2 sharded vs 1×4 replicated: {worst:.2e}')
    assert worst <= 1e-6

    # Export restores the sharded checkpoint whole onto one device.
    config, state, step = export.restore_state(workdir)
    assert config.shard_state and step == max(replicated)
    big = fc1(state.params)
    assert big.sharding.mesh.size == 1 and big.shape == (32, 128)
    mesh = data_mesh(4)
    training = train_lib.build_training(config, mesh, steps_per_epoch=31)
    sharded_state, _ = checkpoint_lib.Checkpointer(
        workdir / 'checkpoints', json_items=('data', 'config')).restore(
        checkpoint_lib.abstract_like(training.state), step=step)
    assert fc1(sharded_state.params).sharding.spec == P('data', None)
    exported = leaves_with_paths(state)
    for path, value in leaves_with_paths(sharded_state).items():
        np.testing.assert_array_equal(exported[path], value, err_msg=path)
