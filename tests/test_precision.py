"""Precision: the float64 scalars of the official code, and the compute dtype."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bam_jax import train as train_lib
from bam_jax.models import multicrop
from bam_jax.train import optimizer as optimizer_lib
from bam_jax.train import schedules as schedules_lib
from configs import mnist, vit_small_imagenet

# The ViT-S/16 run: 400 epochs of ImageNet's 1,281,167 images at batch 4096.
VIT_S_STEPS_PER_EPOCH = 1_281_167 // 4096
VIT_S_STEPS = 400 * VIT_S_STEPS_PER_EPOCH


def test_vit_s_run_length():
    assert (VIT_S_STEPS_PER_EPOCH, VIT_S_STEPS) == (312, 124_800)


def test_one_minus_teacher_momentum_matches_float64_at_every_step():
    """1 − m over the whole ViT-S schedule, against the official formula in extended
    precision (float64 itself cancels: its 1 − m is off by 5e-5 near the end)."""
    config = vit_small_imagenet.get_config()
    schedules = schedules_lib.make_schedules(config, VIT_S_STEPS_PER_EPOCH)
    steps = jnp.arange(VIT_S_STEPS)
    ours = np.asarray(jax.jit(jax.vmap(schedules.one_minus_teacher_momentum))(steps))
    t = np.arange(VIT_S_STEPS, dtype=np.longdouble)
    m0 = np.longdouble(config.teacher_momentum)
    expected = 1 - (1 + (m0 - 1) / 2 * (1 + np.cos(np.longdouble(np.pi) * t / VIT_S_STEPS)))
    relative = np.abs(ours / expected - 1)
    assert relative.max() <= 1e-6, (relative.argmax(), relative.max())
    # m < 1 until the last step: the teacher never stops.
    assert ours.min() > 0 and np.all(1 - ours.astype(np.float64) < 1)
    assert ours[-1] == pytest.approx(float(expected[-1]), rel=1e-6)  # ≈ 7.9e-13
    # What it replaces: m in float32, then 1 − m, is 1e-2 off at 99 % and 0 at the end.
    old = 1 - np.asarray(jax.vmap(schedules_lib.cosine_schedule(
        config.teacher_momentum, 1.0, VIT_S_STEPS))(steps), np.longdouble)
    assert abs(old[int(0.99 * VIT_S_STEPS)] / expected[int(0.99 * VIT_S_STEPS)] - 1) > 1e-2
    assert np.sum(old == 0) == 194
    # The logged m is 1 − (1 − m).
    logged = schedules(jnp.asarray(VIT_S_STEPS // 2))
    assert float(logged['teacher_momentum']) == pytest.approx(0.9975, abs=1e-7)
    assert float(logged['one_minus_teacher_momentum']) == pytest.approx(0.0025, rel=1e-6)


@pytest.mark.parametrize('decay', [0.9, 0.999])
def test_adam_bias_correction_matches_float64_at_every_step(decay):
    counts = np.arange(1, VIT_S_STEPS + 1)
    ours = np.asarray(jax.jit(jax.vmap(
        lambda count: optimizer_lib.bias_correction(decay, count)))(jnp.asarray(counts)))
    expected = -np.expm1(counts * np.log(decay))  # float64: 1e-16 of values ≥ 1e-3
    relative = np.abs(ours / expected - 1)
    assert relative.max() <= 1e-6, (relative.argmax(), relative.max())
    # optax's float32 `1 - decay**count` (measured: 3e-7 for 0.9, 2e-5 for 0.999).
    optax_form = np.asarray(jax.vmap(lambda count: 1 - decay ** count)(
        jnp.asarray(counts, jnp.int32)))
    assert np.abs(optax_form / expected - 1).max() > {0.9: 2e-7, 0.999: 1e-5}[decay]


def test_adamw_state_keeps_the_structure_of_optax_adamw():
    """Checkpoints written with `optax.adamw` restore into the exact-bias-correction chain."""
    params = {'kernel': jnp.zeros((3, 2)), 'bias': jnp.zeros(2)}
    ours = optimizer_lib.make_optimizer('adamw', lambda _: 1.0, lambda _: 0.1,
                                        frozen=train_lib.frozen_mask, clip_grad=0.3)
    theirs = optax.chain(optax.clip_by_global_norm(0.3), optax.multi_transform(
        {'trained': optax.adamw(lambda _: 1.0, weight_decay=lambda _: 0.1,
                                mask=optimizer_lib.decay_mask),
         'frozen': optax.set_to_zero()},
        lambda tree: jax.tree.map(lambda _: 'trained', tree)))
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))


@pytest.mark.parametrize('name, platform, expected', [
    ('auto', 'cpu', jnp.float32), ('auto', 'tpu', jnp.bfloat16),
    ('auto', 'gpu', jnp.bfloat16), ('float32', 'tpu', jnp.float32),
    ('bfloat16', 'cpu', jnp.bfloat16)])
def test_compute_dtype_resolves_per_platform(name, platform, expected):
    config = ml_collections.ConfigDict({'compute_dtype': name})
    assert multicrop.compute_dtype(config, platform) == expected


def test_compute_dtype_auto_is_the_default_and_float32_here():
    for config in (vit_small_imagenet.get_config(), mnist.get_config()):
        assert config.compute_dtype == 'auto'
        assert multicrop.compute_dtype(config) == jnp.float32  # the tests run on the CPU
        assert multicrop.build_network(config).backbone.dtype == jnp.float32
    network = multicrop.build_network(mnist.get_config(), platform='tpu')
    assert network.backbone.dtype == network.projector.dtype == jnp.bfloat16


def test_unknown_compute_dtype_is_one_line_naming_the_key():
    config = mnist.get_config()
    config.compute_dtype = 'float16'
    with pytest.raises(ValueError) as error:
        multicrop.build_network(config)
    assert str(error.value) == ("config.compute_dtype='float16': expected one of "
                                "['auto', 'float32', 'bfloat16'].")
