"""Schedules, optimizers, the train state and the full step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax import train as train_lib
from bam_jax.models.multicrop import build_network
from bam_jax.train import optimizer as optimizer_lib
from bam_jax.train import schedules as schedules_lib
from bam_jax.train import step as step_lib
from configs import mnist, vit_base_imagenet, vit_small_imagenet
from conftest import data_mesh


# ---------------------------------------------------------------------------
# NumPy transcriptions of the official code (`utils.py`, `bam_loss.py`).
# ---------------------------------------------------------------------------
def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep,
                              warmup_epochs=0, start_warmup_value=0):
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def official_reg_schedule(reg, reg_final, epochs):
    return np.concatenate((np.linspace(reg, reg_final, 30),
                           np.ones(max(epochs - 30, 0)) * reg_final))[:epochs]


@pytest.mark.parametrize('base, final, epochs, niter, warmup', [
    (4.8e-3, 1e-3, 10, 7, 4),    # lr with warm-up
    (0.04, 0.4, 5, 3, 0),        # weight decay
    (0.995, 1.0, 3, 11, 0),      # teacher momentum
    (1.0, 0.0, 4, 1, 1),         # one warm-up step: linspace(0, base, 1) == [0]
])
def test_cosine_schedule_matches_official_at_every_step(base, final, epochs, niter,
                                                        warmup):
    expected = official_cosine_scheduler(base, final, epochs, niter, warmup)
    schedule = jax.jit(jax.vmap(schedules_lib.cosine_schedule(
        base, final, epochs * niter, warmup * niter)))
    np.testing.assert_allclose(schedule(jnp.arange(epochs * niter)), expected,
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('epochs', [5, 45])
def test_sinkhorn_reg_schedule_matches_official_per_epoch(epochs):
    steps_per_epoch = 3
    expected = np.repeat(official_reg_schedule(0.1, 0.05, epochs), steps_per_epoch)
    schedule = schedules_lib.sinkhorn_reg_schedule(0.1, 0.05, steps_per_epoch)
    np.testing.assert_allclose(jax.vmap(schedule)(jnp.arange(epochs * steps_per_epoch)),
                               expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# Optimizers against transcriptions of torch AdamW and the official LARS.
# ---------------------------------------------------------------------------
def random_problem(steps=5):
    rng = np.random.default_rng(0)
    params = {'kernel': rng.normal(size=(4, 3)), 'bias': rng.normal(size=(3,)),
              'cls_token': rng.normal(size=(1, 1, 3)),
              'patch_embed': {'proj': {'kernel': rng.normal(size=(2, 2))}}}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params)
             for _ in range(steps)]
    return params, grads


def official_adamw(params, grads, lrs, wds, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW, one param group per decay rule, frozen leaves excluded."""
    m = jax.tree.map(np.zeros_like, params)
    v = jax.tree.map(np.zeros_like, params)
    for t, (grad, lr, wd) in enumerate(zip(grads, lrs, wds), start=1):
        def step(path, p, g, m, v):
            if 'patch_embed' in jax.tree_util.keystr(path):
                return p, m, v
            decay = wd if p.ndim > 1 else 0.0
            p = p * (1 - lr * decay)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
            return p - lr / (1 - b1 ** t) * m / denom, m, v
        out = jax.tree_util.tree_map_with_path(step, params, grad, m, v)
        params, m, v = (jax.tree.map(lambda o, i=i: o[i], out,
                                     is_leaf=lambda o: isinstance(o, tuple))
                        for i in range(3))
    return params


def official_lars(params, grads, lrs, wds, eta=0.001, momentum=0.9):
    """`utils.LARS`: decay and trust ratio only for ndim > 1; lr times the buffer."""
    mu = jax.tree.map(np.zeros_like, params)
    for grad, lr, wd in zip(grads, lrs, wds):
        def step(path, p, g, mu):
            if 'patch_embed' in jax.tree_util.keystr(path):
                return p, mu
            if p.ndim != 1:
                g = g + wd * p
                p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
                g = g * (eta * p_norm / g_norm if p_norm > 0 and g_norm > 0 else 1.0)
            mu = momentum * mu + g
            return p - lr * mu, mu
        out = jax.tree_util.tree_map_with_path(step, params, grad, mu)
        params, mu = (jax.tree.map(lambda o, i=i: o[i], out,
                                   is_leaf=lambda o: isinstance(o, tuple))
                      for i in range(2))
    return params


@pytest.mark.parametrize('name, official', [('adamw', official_adamw),
                                            ('lars', official_lars)])
def test_optimizer_matches_official(name, official):
    params, grads = random_problem()
    lr = schedules_lib.cosine_schedule(0.1, 0.01, 5, 2)
    wd = schedules_lib.cosine_schedule(0.04, 0.4, 5)
    tx = optimizer_lib.make_optimizer(name, lr, wd, frozen=train_lib.frozen_mask)
    state = tx.init(params)
    ours = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    for grad in grads:
        updates, state = tx.update(grad, state, ours)
        ours = optax.apply_updates(ours, updates)
    expected = official(params, grads, [float(lr(t)) for t in range(5)],
                        [float(wd(t)) for t in range(5)])
    # float32 against float64 over 5 steps (params ~1): measured 2.4e-7 at most; optax's
    # own float32 bias corrections were 2.1e-6 off.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=3e-7),
                 ours, expected)
    np.testing.assert_array_equal(ours['patch_embed']['proj']['kernel'],
                                  np.float32(params['patch_embed']['proj']['kernel']))


def test_clipping_is_one_global_norm():
    tx = optimizer_lib.make_optimizer('lars', lambda _: 1.0, lambda _: 0.0,
                                      frozen=train_lib.frozen_mask, clip_grad=0.3,
                                      lars_momentum=0.0)
    params = {'a': jnp.zeros(3), 'b': jnp.zeros(2)}
    grads = {'a': jnp.array([3.0, 0.0, 0.0]), 'b': jnp.array([0.0, 4.0])}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates['a'], [-0.18, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(updates['b'], [0, -0.24], rtol=1e-6)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        optimizer_lib.make_optimizer('lamb', lambda _: 1.0, lambda _: 0.0,
                                     frozen=train_lib.frozen_mask)


# ---------------------------------------------------------------------------
# Paper-scale configs build (abstractly) with the official parameter counts.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('config_module, backbone_count', [
    (vit_small_imagenet, 21_665_664), (vit_base_imagenet, 85_798_656)])
def test_paper_config_train_state_eval_shape(config_module, backbone_count):
    config = config_module.get_config()
    network = build_network(config)
    schedules = schedules_lib.make_schedules(config, steps_per_epoch=312)
    tx = optimizer_lib.make_optimizer('adamw', schedules.learning_rate,
                                      schedules.weight_decay,
                                      frozen=train_lib.frozen_mask)
    state = jax.eval_shape(lambda: train_lib.create_train_state(
        network, tx, jax.random.PRNGKey(0), train_lib.crop_shapes(config, 2),
        teacher=True))
    assert train_lib.count_params(state.params['backbone']) == backbone_count
    embed_dim = state.params['backbone']['norm']['scale'].shape[0]
    assert train_lib.count_params(state.params['projector']) == (
        embed_dim * 4096 + 4096 + 2 * (4096 * 4096 + 4096))
    if config_module is vit_small_imagenet:
        assert train_lib.count_params(state.params['projector']) == 35_139_584
    assert jax.tree.structure(state.teacher_params) == jax.tree.structure(state.params)


# ---------------------------------------------------------------------------
# The full step on a tiny ViT.
# ---------------------------------------------------------------------------
def tiny_config(**loss_overrides):
    config = vit_small_imagenet.get_config()
    config.batch_size = 16
    config.epochs = 10
    config.model = ml_collections.ConfigDict(dict(
        name='vit', variant='tiny', patch_size=4, img_size=16, embed_dim=32, depth=2,
        num_heads=2, drop_path_rate=0.1, remat=False))
    config.projector.update(hidden_dim=64, out_dim=32)
    config.crops.update(global_size=16, local_size=8, n_local=2)
    config.loss.update(top_k=8, **loss_overrides)
    config.optimizer.update(lr=0.05, warmup_epochs=1)
    return config


def random_batch(config, seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    shapes = train_lib.crop_shapes(config, config.batch_size)
    crops = [jax.random.normal(key, shape) for key, shape in zip(keys, shapes)]
    return dict(zip(('global', 'local'), crops))


def place(batch, mesh):
    return jax.device_put(batch, NamedSharding(mesh, P(None, 'data')))


def leaves_with_paths(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_fifty_steps_on_eight_devices():
    config = tiny_config()
    mesh = data_mesh(8)
    training = train_lib.build_training(config, mesh, steps_per_epoch=5)
    state = training.state
    initial = leaves_with_paths(state.params)
    frozen = {path for path in initial
              if 'pos_embed' in path or "'patch_embed']['proj'" in path}
    assert len(frozen) == 3
    for step in range(50):
        previous_teacher = leaves_with_paths(state.teacher_params)
        state, metrics = training.train_step(state, place(random_batch(config, step), mesh))
        for value in metrics.values():
            assert np.isfinite(np.asarray(value)).all()
        if step in (0, 49):  # the teacher moved by exactly the EMA rule
            rate = np.float32(training.schedules.one_minus_teacher_momentum(step + 1))
            assert np.float32(metrics['one_minus_teacher_momentum']) == rate
            student = leaves_with_paths(state.params)
            for path, teacher in leaves_with_paths(state.teacher_params).items():
                previous = previous_teacher[path]
                expected = (previous if path in frozen else
                            previous + rate * (student[path] - previous))
                np.testing.assert_allclose(teacher, expected, rtol=1e-6, atol=1e-9)
    assert int(state.step) == 50
    assert training.train_step._cache_size() == 1  # compiled once
    final = leaves_with_paths(state.params)
    teacher = leaves_with_paths(state.teacher_params)
    for path in initial:
        if path in frozen:
            np.testing.assert_array_equal(final[path], initial[path])
            np.testing.assert_array_equal(teacher[path], initial[path])
        else:
            assert not np.array_equal(final[path], initial[path]), path
            assert not np.array_equal(teacher[path], final[path]), path


@pytest.mark.parametrize('teacher', [True, False], ids=['teacher', 'student_only'])
def test_one_step_is_independent_of_device_count(teacher):
    config = tiny_config()
    config.teacher = teacher
    config.model.drop_path_rate = 0.0
    batch = random_batch(config, 0)
    results = []
    for n_devices in (1, 8):
        mesh = data_mesh(n_devices)
        training = train_lib.build_training(config, mesh, steps_per_epoch=5)
        state, metrics = training.train_step(training.state, place(batch, mesh))
        results.append((leaves_with_paths(state.params), float(metrics['loss'])))
    (params_1, loss_1), (params_8, loss_8) = results
    np.testing.assert_allclose(loss_1, loss_8, rtol=1e-6)
    for path in params_1:
        np.testing.assert_allclose(params_1[path], params_8[path], rtol=1e-6, atol=1e-6,
                                   err_msg=path)


def test_metrics_report_every_schedule_value():
    config = tiny_config()
    mesh = data_mesh(2)
    training = train_lib.build_training(config, mesh, steps_per_epoch=5)
    _, metrics = training.train_step(training.state, place(random_batch(config, 0), mesh))
    assert {'loss', 'source_entropy', 'target_entropy', 'embedding_std', 'learning_rate',
            'weight_decay', 'teacher_momentum', 'one_minus_teacher_momentum',
            'sinkhorn_reg', 'grad_norm', 'param_norm', 'update_norm'} <= set(metrics)
    assert float(metrics['learning_rate']) == 0.0  # first warm-up step
    assert float(metrics['weight_decay']) == pytest.approx(0.04)
    assert float(metrics['sinkhorn_reg']) == pytest.approx(0.05)
    # The EMA ending step 0 uses m[1] = 1 − 0.005·sin²(π(T − 1)/2T), T = 50.
    assert float(metrics['one_minus_teacher_momentum']) == pytest.approx(
        0.005 * np.sin(np.pi * 49 / 100) ** 2, rel=1e-6)
    assert float(metrics['teacher_momentum']) == pytest.approx(
        1 - 0.005 * np.sin(np.pi * 49 / 100) ** 2, abs=1e-7)


def test_bfloat16_compute_tracks_float32_and_keeps_float32_state():
    """100 steps of a tiny ViT in bfloat16 and in float32, on the same batches."""
    config = tiny_config()
    config.model.drop_path_rate = 0.0
    mesh = data_mesh(2)
    batches = [place(random_batch(config, step), mesh) for step in range(100)]
    losses = {}
    for dtype in ('float32', 'bfloat16'):
        config.compute_dtype = dtype
        training = train_lib.build_training(config, mesh, steps_per_epoch=10)
        state = training.state
        losses[dtype] = []
        for batch in batches:
            state, metrics = training.train_step(state, batch)
            losses[dtype].append(float(metrics['loss']))
        assert metrics['loss'].dtype == jnp.float32
        for part in (state.params, state.teacher_params, state.opt_state):
            assert {str(leaf.dtype) for leaf in jax.tree.leaves(part)
                    if jnp.issubdtype(leaf.dtype, jnp.floating)} == {'float32'}
    float32, bfloat16 = (np.asarray(losses[dtype]) for dtype in ('float32', 'bfloat16'))
    # Measured: 2.2e-3 apart at step 0 (the forward's rounding alone), at most 0.023 in
    # the warm-up, 0.006 at the end; the last ten losses' means agree to 1.2e-3 while the
    # float32 loss falls by 0.10 (its step-to-step spread is 0.017). bfloat16 does not drift.
    assert bfloat16[0] != float32[0]  # bfloat16 is really in use
    np.testing.assert_array_less(np.abs(bfloat16 - float32), 0.05)
    assert abs(bfloat16[-10:].mean() - float32[-10:].mean()) < 0.01
    assert float32[:10].mean() - float32[-10:].mean() > 0.05


def test_cpu_step_gives_ynnpack_the_matmuls_alone(monkeypatch):
    """`CPU_COMPILER_OPTIONS`: fewer step temporaries than XLA:CPU's default, same losses."""
    config = mnist.get_config()  # at 64 images, one block of width 64
    config.update(batch_size=64)
    # The step it was measured on: 4 local crops and every column (the MNIST default
    # until 2026-12-07; without local crops the ratio is 0.87).
    config.crops.n_local = 4
    config.loss.top_k = 0
    config.model.update(depth=1, embed_dim=64)
    mesh = data_mesh(1)
    batches = [place(random_batch(config, step), mesh) for step in range(2)]
    temporaries, losses = {}, {}
    for name, options in (('default', None), ('ours', step_lib.CPU_COMPILER_OPTIONS)):
        monkeypatch.setattr(step_lib, 'CPU_COMPILER_OPTIONS', options)
        training = train_lib.build_training(config, mesh, steps_per_epoch=10)
        compiled = training.train_step.lower(training.state, batches[0]).compile()
        temporaries[name] = compiled.memory_analysis().temp_size_in_bytes
        state, losses[name] = training.state, []
        for batch in batches:
            state, metrics = compiled(state, batch)
            losses[name].append(float(metrics['loss']))
    # Measured: 0.80 of the default here, 0.78 for issue 15's tiny ViT, 0.82 for the
    # MNIST default, 0.89 for ViT-S/16 at 8 images. At 16 images of a width-32 ViT it
    # turns (1.05: 0.25 MB more).
    assert temporaries['ours'] < 0.85 * temporaries['default']
    np.testing.assert_allclose(losses['ours'], losses['default'], rtol=1e-6)


def test_abstract_training_compiles_ahead_of_time_for_the_real_state():
    """`abstract=True` allocates nothing, yet its step compiles for the real state."""
    config = tiny_config()
    mesh = data_mesh(4)
    abstract = train_lib.build_training(config, mesh, steps_per_epoch=5, abstract=True)
    real = train_lib.build_training(config, mesh, steps_per_epoch=5)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct)
               for leaf in jax.tree.leaves(abstract.state))
    assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), abstract.state) == \
        jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), real.state)
    batch = place(random_batch(config, 0), mesh)
    compiled = abstract.train_step.lower(abstract.state, batch).compile()
    state, metrics = compiled(real.state, batch)
    assert np.isfinite(float(metrics['loss']))
    assert int(state.step) == 1
