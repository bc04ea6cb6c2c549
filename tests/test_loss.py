"""The BAM loss against float64 golden values, on meshes of 1, 2, 4 and 8 devices."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax import loss as loss_lib
from conftest import data_mesh

GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'golden'
CASES = json.loads((GOLDEN_DIR / 'bam_loss_golden.json').read_text())
CASE_IDS = [case['name'] for case in CASES]


@functools.cache
def golden_arrays():
    with np.load(GOLDEN_DIR / 'bam_loss_golden.npz') as data:
        return {key: data[key] for key in data.files}


def case_inputs(case):
    arrays = golden_arrays()
    name = case['name']
    teacher = arrays[f'{name}/z_teacher'] if case['teacher'] else None
    return arrays[f'{name}/z_student'], teacher


def loss_kwargs(case):
    return dict(n_global_crops=case['n_global_crops'], temperature=case['temperature'],
                sinkhorn_reg=case['sinkhorn_reg'], sinkhorn_iters=case['sinkhorn_iters'],
                top_k=case['top_k'], positive_masking=case['positive_masking'])


def run_sharded(case, mesh):
    """Loss, d loss / d student and targets, with inputs sharded on the image axis."""
    student, teacher = case_inputs(case)
    rows = NamedSharding(mesh, P(None, 'data', None))
    student = jax.device_put(jnp.asarray(student, jnp.float32), rows)
    if teacher is not None:
        teacher = jax.device_put(jnp.asarray(teacher, jnp.float32), rows)

    def loss_and_targets(student):
        loss, _, targets = loss_lib.bam_loss(student, teacher, mesh=mesh,
                                             return_targets=True, **loss_kwargs(case))
        return loss, targets

    (loss, targets), grad = jax.jit(
        jax.value_and_grad(loss_and_targets, has_aux=True))(student)
    return float(loss), np.asarray(grad), np.asarray(targets)


def assert_matches_golden(case, loss, grad, targets):
    arrays = golden_arrays()
    name = case['name']
    np.testing.assert_allclose(loss, arrays[f'{name}/loss'], rtol=1e-6, atol=0)
    golden_grad = arrays[f'{name}/grad_z_student']
    np.testing.assert_allclose(grad, golden_grad, rtol=1e-5,
                               atol=1e-5 * np.abs(golden_grad).max())
    np.testing.assert_allclose(targets, arrays[f'{name}/targets'], rtol=0, atol=1e-6)


@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_golden_values_on_every_mesh(case, mesh):
    assert_matches_golden(case, *run_sharded(case, mesh))


@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_golden_values_without_mesh(case):
    student, teacher = case_inputs(case)
    loss, metrics, targets = jax.jit(functools.partial(
        loss_lib.bam_loss, return_targets=True, **loss_kwargs(case)))(
            jnp.asarray(student, jnp.float32),
            None if teacher is None else jnp.asarray(teacher, jnp.float32))
    np.testing.assert_allclose(float(loss), golden_arrays()[f"{case['name']}/loss"],
                               rtol=1e-6)
    np.testing.assert_allclose(targets, golden_arrays()[f"{case['name']}/targets"],
                               atol=1e-6)
    assert set(metrics) == {'source_entropy', 'target_entropy', 'embedding_std'}


def test_context_mesh_is_used():
    """With `jax.set_mesh`, bam_loss runs sharded without being handed the mesh."""
    case = CASES[1]
    mesh = data_mesh(4)
    student, teacher = case_inputs(case)
    with jax.set_mesh(mesh):
        loss, _ = jax.jit(functools.partial(loss_lib.bam_loss, **loss_kwargs(case)))(
            jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32))
    np.testing.assert_allclose(float(loss), golden_arrays()[f"{case['name']}/loss"],
                               rtol=1e-6)


# ---------------------------------------------------------------------------
# The tests discriminate: plausible distributed mistakes fail them.
# ---------------------------------------------------------------------------
def per_device_sinkhorn(similarity, mask, sinkhorn_reg, sinkhorn_iters, axis_name=None):
    """Wrong: balances columns over this device's rows only (no psum)."""
    del axis_name
    return ORIGINAL_SINKHORN(similarity, mask, sinkhorn_reg, sinkhorn_iters, None)


def mask_of_wrong_device(n_local_images, n_target_crops, n_global_images, first_image):
    """Wrong: every device masks the columns of device 0's images."""
    del first_image
    return ORIGINAL_MASK(n_local_images, n_target_crops, n_global_images, 0)


ORIGINAL_SINKHORN = loss_lib.sinkhorn
ORIGINAL_MASK = loss_lib.positive_mask


@pytest.mark.parametrize('wrong', [per_device_sinkhorn, mask_of_wrong_device])
@pytest.mark.parametrize('n_devices', [1, 4])
def test_wrong_distributed_variants_fail_golden(monkeypatch, wrong, n_devices):
    target = 'sinkhorn' if wrong is per_device_sinkhorn else 'positive_mask'
    monkeypatch.setattr(loss_lib, target, wrong)
    case = CASES[1]  # multicrop_teacher
    results = run_sharded(case, data_mesh(n_devices))
    if n_devices == 1:  # on one device the variants are not wrong at all
        assert_matches_golden(case, *results)
    else:
        with pytest.raises(AssertionError):
            assert_matches_golden(case, *results)


# ---------------------------------------------------------------------------
# Properties of the targets.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_targets_row_stochastic_and_zero_on_positives(case):
    _, _, targets = run_sharded(case, data_mesh(2))
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
    assert (targets >= 0).all()
    n_images = targets.shape[1]
    column_image = np.arange(targets.shape[-1]) % n_images
    positives = column_image[None, :] == np.arange(n_images)[:, None]
    on_positives = targets[:, positives]
    if case['positive_masking']:
        assert (on_positives == 0).all()
    else:
        assert (on_positives > 0).all()
    if case['top_k']:
        assert ((targets > 0).sum(-1) == case['top_k']).all()


@pytest.mark.parametrize('case', [CASES[0], CASES[1]], ids=CASE_IDS[:2])
def test_no_gradient_through_targets(case):
    student, teacher = case_inputs(case)
    student = jnp.asarray(student, jnp.float32)
    teacher = None if teacher is None else jnp.asarray(teacher, jnp.float32)
    weights = jax.random.normal(jax.random.key(0), golden_arrays()[
        f"{case['name']}/targets"].shape)

    def weighted_targets(student, teacher):
        targets = loss_lib.bam_loss(student, teacher, mesh=data_mesh(2),
                                    return_targets=True, **loss_kwargs(case))[2]
        return jnp.sum(targets * weights)

    grads = jax.grad(weighted_targets, argnums=(0, 1) if teacher is not None else 0)(
        student, teacher)
    for grad in jax.tree.leaves(grads):
        assert not np.any(np.asarray(grad))


def test_sinkhorn_balances_columns_globally():
    """Many sweeps drive every global column sum to the same value."""
    mesh = data_mesh(4)
    similarity = jax.random.uniform(jax.random.key(1), (3, 8, 16), minval=-1, maxval=1)
    mask = jnp.zeros((8, 16), bool)
    run = jax.jit(jax.shard_map(
        lambda s: loss_lib.sinkhorn(s, mask[:2], 0.05, 200, 'data'), mesh=mesh,
        in_specs=P(None, 'data'), out_specs=P(None, 'data')))
    plan = np.asarray(run(similarity))
    np.testing.assert_allclose(plan.sum(-1), 1.0, atol=1e-6)
    column_sums = plan.sum((0, 1))
    np.testing.assert_allclose(column_sums, column_sums.mean(), rtol=1e-4)


def test_zero_iterations_is_the_row_softmax():
    similarity = jax.random.uniform(jax.random.key(2), (2, 4, 12), minval=-1, maxval=1)
    mask = jnp.zeros((4, 12), bool)
    np.testing.assert_allclose(loss_lib.sinkhorn(similarity, mask, 0.05, 0),
                               jax.nn.softmax(similarity / 0.05, axis=-1), rtol=1e-5,
                               atol=1e-9)


# ---------------------------------------------------------------------------
# Diagnostics, dtypes and bad input.
# ---------------------------------------------------------------------------
def test_metrics_are_sane_and_mesh_invariant():
    case = CASES[1]
    student, teacher = (jnp.asarray(x, jnp.float32) for x in case_inputs(case))
    values = []
    for n_devices in (1, 8):
        _, metrics = loss_lib.bam_loss(student, teacher, mesh=data_mesh(n_devices),
                                       **loss_kwargs(case))
        values.append({k: float(v) for k, v in metrics.items()})
    for key in values[0]:
        np.testing.assert_allclose(values[0][key], values[1][key], rtol=1e-6)
    n_free_columns = 2 * student.shape[1] - 2
    assert 0 < values[0]['target_entropy'] < np.log(n_free_columns)
    assert 0 < values[0]['source_entropy'] < np.log(n_free_columns)
    assert 0 < values[0]['embedding_std'] < 1
    collapsed = jnp.ones_like(student)
    _, metrics = loss_lib.bam_loss(collapsed, collapsed, **loss_kwargs(case))
    assert float(metrics['embedding_std']) == pytest.approx(0.0, abs=1e-6)
    # Identical rows: the target is uniform over the 2B - 2 free columns.
    assert float(metrics['target_entropy']) == pytest.approx(np.log(n_free_columns),
                                                             rel=1e-5)


def test_bfloat16_embeddings_are_computed_in_float32():
    case = CASES[1]
    student, teacher = (jnp.asarray(x, jnp.bfloat16) for x in case_inputs(case))
    loss_bf16, _ = loss_lib.bam_loss(student, teacher, **loss_kwargs(case))
    loss_f32, _ = loss_lib.bam_loss(student.astype(jnp.float32),
                                    teacher.astype(jnp.float32), **loss_kwargs(case))
    assert loss_bf16.dtype == jnp.float32
    assert float(loss_bf16) == float(loss_f32)


@pytest.mark.parametrize('kwargs, message', [
    (dict(top_k=100), 'top_k=100 exceeds'),
    (dict(n_global_crops=7), 'n_global_crops'),
    (dict(mesh='three'), 'do not split'),
])
def test_bad_arguments_are_named(kwargs, message):
    student = jnp.zeros((6, 12, 8))
    if kwargs.get('mesh') == 'three':
        kwargs = dict(mesh=data_mesh(8))
    with pytest.raises(ValueError, match=message):
        loss_lib.bam_loss(student, **kwargs)
