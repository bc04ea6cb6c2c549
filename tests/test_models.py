"""Tests of the ViT backbone and the projection head against the official spec."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import special

from bam_jax.models import (ProjectionHead, VisionTransformer, is_frozen,
                            resize_pos_embed, sincos_pos_embed_2d, vit)
from bam_jax.models.vit import PatchEmbed

TINY = dict(patch_size=4, img_size=32, embed_dim=32, depth=2, num_heads=4)


def _flat(tree):
    return {tuple(str(key.key) for key in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _init(model, image_shape=(2, 32, 32, 3)):
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros(image_shape))


@functools.cache
def _jitted_apply(model, static_kwargs):
    return jax.jit(functools.partial(model.apply, **dict(static_kwargs)))


def _apply(model, variables, inputs, *, rngs=None, **static_kwargs):
    """Jitted `model.apply`, compiled once per (model, static kwargs); CPU compiles are
    what make these tests slow. Pass `method` by name."""
    return _jitted_apply(model, tuple(sorted(static_kwargs.items())))(
        variables, inputs, rngs=rngs)


def _abstract(model, input_shape=(2, 32, 32, 3)):
    """Variables as shapes and dtypes only: no compile, no memory."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))


@pytest.fixture(scope='module')
def tiny_variables():
    return _init(VisionTransformer(**TINY))


# ----------------------------------------------------------------------------- sizes


def test_param_counts_match_official():
    small = _abstract(vit('small'), (1, 224, 224, 3))
    trainable = sum(math.prod(leaf.shape) for path, leaf in _flat(small['params']).items()
                    if not is_frozen(path))
    assert _count(small) == 21_665_664
    assert trainable == 21_294_720
    assert _count(_abstract(vit('base'), (1, 224, 224, 3))) == 85_798_656
    assert _count(_abstract(ProjectionHead(), (2, 384))) == 35_139_584


def _timm_vit_small_keys():
    """The 150 state-dict keys and torch shapes of the official ViT-S/16 backbone."""
    dim, hidden = 384, 1536
    keys = {'cls_token': (1, 1, dim), 'pos_embed': (1, 197, dim),
            'patch_embed.proj.weight': (dim, 3, 16, 16), 'patch_embed.proj.bias': (dim,),
            'norm.weight': (dim,), 'norm.bias': (dim,)}
    for i in range(12):
        keys |= {f'blocks.{i}.norm1.weight': (dim,), f'blocks.{i}.norm1.bias': (dim,),
                 f'blocks.{i}.attn.qkv.weight': (3 * dim, dim),
                 f'blocks.{i}.attn.qkv.bias': (3 * dim,),
                 f'blocks.{i}.attn.proj.weight': (dim, dim),
                 f'blocks.{i}.attn.proj.bias': (dim,),
                 f'blocks.{i}.norm2.weight': (dim,), f'blocks.{i}.norm2.bias': (dim,),
                 f'blocks.{i}.mlp.fc1.weight': (hidden, dim),
                 f'blocks.{i}.mlp.fc1.bias': (hidden,),
                 f'blocks.{i}.mlp.fc2.weight': (dim, hidden),
                 f'blocks.{i}.mlp.fc2.bias': (dim,)}
    return keys


def test_param_tree_maps_onto_timm_keys():
    params = _abstract(vit('small'), (1, 224, 224, 3))['params']
    assert _flat(params)[('blocks_3', 'attn', 'qkv', 'kernel')].shape == (384, 1152)
    mapped = {}
    for path, leaf in _flat(params).items():
        *modules, leaf_name = path
        key = '.'.join(modules).replace('blocks_', 'blocks.')
        shape = leaf.shape
        if leaf_name == 'kernel' and len(shape) == 2:  # Dense [in, out] → [out, in]
            shape = shape[::-1]
        elif leaf_name == 'kernel':  # Conv [kh, kw, in, out] → [out, in, kh, kw]
            shape = (shape[3], shape[2], shape[0], shape[1])
        name = {'kernel': 'weight', 'scale': 'weight'}.get(leaf_name, leaf_name)
        mapped[f'{key}.{name}' if key else name] = shape
    expected = _timm_vit_small_keys()
    assert len(expected) == 150
    assert mapped == expected


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match='base.*small.*tiny'):
        vit('huge')
    assert vit('small', depth=2, patch_size=8).num_heads == 12


# ----------------------------------------------------------------------- initialisation


def test_initialisation_follows_timm_moco(tiny_variables):
    dim = TINY['embed_dim']
    params = _flat(tiny_variables['params'])
    qkv = np.asarray(params[('blocks_0', 'attn', 'qkv', 'kernel')])
    qkv_bound = math.sqrt(6 / (dim + dim))  # q, k, v each count as D → D
    assert np.abs(qkv).max() <= qkv_bound
    assert np.abs(qkv).max() > 0.98 * qkv_bound  # not the fused-matrix bound √(6/4D)
    assert np.std(qkv) == pytest.approx(qkv_bound / math.sqrt(3), rel=0.03)
    histogram, _ = np.histogram(qkv, bins=4, range=(-qkv_bound, qkv_bound))
    assert histogram.min() > 0.85 * histogram.mean()  # flat, not bell-shaped

    fc1 = np.asarray(params[('blocks_1', 'mlp', 'fc1', 'kernel')])
    xavier_bound = math.sqrt(6 / (dim + 4 * dim))
    assert xavier_bound * 0.98 < np.abs(fc1).max() <= xavier_bound

    conv_bound = 1 / math.sqrt(3 * 4 * 4)
    for leaf in ('kernel', 'bias'):
        conv = np.asarray(params[('patch_embed', 'proj', leaf)])
        assert np.abs(conv).max() <= conv_bound
    assert np.abs(params[('patch_embed', 'proj', 'kernel')]).max() > 0.98 * conv_bound

    assert 0 < np.abs(params[('cls_token',)]).max() < 1e-5
    for path, leaf in params.items():
        if path[-1] == 'bias' and path[0] != 'patch_embed':
            assert not np.any(leaf), path
        if path[-1] == 'scale':
            np.testing.assert_array_equal(leaf, 1.0)


def test_patch_conv_bound_at_patch_16():
    patch_embed = PatchEmbed(patch_size=16, embed_dim=64)
    params = jax.jit(patch_embed.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    kernel = np.asarray(params['params']['proj']['kernel'])
    assert 0.0355 < np.abs(kernel).max() <= 1 / math.sqrt(3 * 16 * 16)  # ±0.0361


# --------------------------------------------------------------------- position table


def _moco_v3_sincos(height, width, dim, temperature=10000.0):
    """Transcription of MoCo-v3's build_2d_sincos_position_embedding (float32, torch
    meshgrid's 'ij' indexing), without the CLS slot."""
    grid_w = np.arange(width, dtype=np.float32)
    grid_h = np.arange(height, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(grid_w, grid_h, indexing='ij')
    pos_dim = dim // 4
    omega = np.arange(pos_dim, dtype=np.float32) / pos_dim
    omega = 1.0 / temperature ** omega
    out_w = np.einsum('m,d->md', grid_w.flatten(), omega)
    out_h = np.einsum('m,d->md', grid_h.flatten(), omega)
    return np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)],
                          axis=1)[None]


def test_sincos_table_matches_moco_v3():
    table = sincos_pos_embed_2d(14, 384)
    assert table.shape == (1, 197, 384) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0, 0], 0.0)
    np.testing.assert_allclose(table[:, 1:], _moco_v3_sincos(14, 14, 384), atol=2e-6)
    # The layout in words: token row*g + col is [sin(row ω), cos(row ω), sin(col ω), ...].
    row, col, quarter = 2, 9, 96
    omega = 1 / 10000 ** (np.arange(quarter) / quarter)
    token = table[0, 1 + row * 14 + col]
    np.testing.assert_allclose(token[:quarter], np.sin(row * omega), atol=1e-6)
    np.testing.assert_allclose(token[2 * quarter:3 * quarter], np.sin(col * omega),
                               atol=1e-6)
    with pytest.raises(ValueError):
        sincos_pos_embed_2d(4, 30)


def _pil_bicubic(patch_table, grid, new_hw):
    """Per-channel PIL bicubic resize: the filter torch's antialiased bicubic copies."""
    channels = patch_table.reshape(grid, grid, -1)
    resized = [np.asarray(Image.fromarray(channels[:, :, d]).resize(
        (new_hw[1], new_hw[0]), Image.Resampling.BICUBIC)) for d in range(channels.shape[-1])]
    return np.stack(resized, axis=-1).reshape(1, new_hw[0] * new_hw[1], -1)


@pytest.mark.parametrize('new_hw', [(6, 6), (20, 20), (6, 9)])
def test_resize_pos_embed_is_antialiased_bicubic(new_hw):
    table = sincos_pos_embed_2d(14, 16)
    table[0, 0] = np.arange(16)  # the CLS slot must be carried over untouched
    resized = np.asarray(resize_pos_embed(jnp.asarray(table), new_hw))
    assert resized.shape == (1, 1 + new_hw[0] * new_hw[1], 16)
    np.testing.assert_array_equal(resized[0, 0], np.arange(16))
    np.testing.assert_allclose(resized[:, 1:], _pil_bicubic(table[0, 1:], 14, new_hw),
                               atol=1e-5)


def test_resize_pos_embed_to_own_grid_and_smoothness():
    table = jnp.asarray(sincos_pos_embed_2d(14, 64))
    assert resize_pos_embed(table, (14, 14)) is table
    small = np.asarray(resize_pos_embed(table, (6, 6)))[0, 1:].reshape(6, 6, 64)
    # Channel 15 is sin(row·ω) with the lowest frequency, ω ≈ 2e-4: nearly linear in the
    # row, so the resampled one must still increase down the rows.
    slow = small[:, 0, 15]
    assert np.all(np.diff(slow) > 0)
    np.testing.assert_allclose(small[:, :, 15], small[:, :1, 15].repeat(6, axis=1),
                               atol=1e-6)  # a row-only channel stays row-only


def test_model_resamples_table_for_other_image_sizes():
    model = VisionTransformer(patch_size=16, img_size=224, embed_dim=32, depth=1,
                              num_heads=2)
    variables = _init(model, (1, 96, 96, 3))  # the params do not depend on the input size
    tokens = _apply(model, variables, jnp.zeros((2, 96, 96, 3)), method='_embed')
    params = variables['params']
    expected = resize_pos_embed(params['pos_embed'], (6, 6))[0, 1:]
    np.testing.assert_allclose(tokens[0, 1:] - params['patch_embed']['proj']['bias'],
                               expected, atol=1e-6)
    np.testing.assert_allclose(tokens[0, 0], params['cls_token'][0, 0], atol=1e-7)
    features = _apply(model, variables, _images((2, 96, 160, 3)), method='encode')
    assert features['blocks'][0].shape == (2, 1 + 6 * 10, 32)
    assert np.all(np.isfinite(features['cls']))
    with pytest.raises(ValueError, match='multiple of patch_size'):
        _apply(model, variables, jnp.zeros((1, 100, 96, 3)))


# ------------------------------------------------------------------------- forward


def _numpy_vit(params, images, patch_size, num_heads):
    """Float64 reference of timm's ViT forward, written from the timm source semantics."""
    p = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)

    def layer_norm(x, norm):
        mean = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-6) * norm['scale'] + norm['bias']

    def linear(x, dense):
        return x @ dense['kernel'] + dense['bias']

    images = np.asarray(images, np.float64)
    n, h, w, c = images.shape
    rows, cols = h // patch_size, w // patch_size
    patches = images.reshape(n, rows, patch_size, cols, patch_size, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows * cols, -1)
    conv = p['patch_embed']['proj']
    x = patches @ conv['kernel'].reshape(-1, conv['kernel'].shape[-1]) + conv['bias']
    x = np.concatenate([np.repeat(p['cls_token'], n, axis=0), x], axis=1) + p['pos_embed']
    dim = x.shape[-1]
    head_dim = dim // num_heads
    depth = sum(key.startswith('blocks_') for key in p)
    for i in range(depth):
        block = p[f'blocks_{i}']
        qkv = linear(layer_norm(x, block['norm1']), block['attn']['qkv'])
        q, k, v = qkv.reshape(n, -1, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        logits = q @ k.transpose(0, 1, 3, 2) * head_dim ** -0.5
        attention = np.exp(logits - logits.max(-1, keepdims=True))
        attention /= attention.sum(-1, keepdims=True)
        out = (attention @ v).transpose(0, 2, 1, 3).reshape(n, -1, dim)
        x = x + linear(out, block['attn']['proj'])
        hidden = linear(layer_norm(x, block['norm2']), block['mlp']['fc1'])
        hidden = 0.5 * hidden * (1 + special.erf(hidden / np.sqrt(2)))
        x = x + linear(hidden, block['mlp']['fc2'])
    return layer_norm(x, p['norm'])[:, 0]


def test_forward_matches_numpy_reference(tiny_variables):
    model = VisionTransformer(**TINY)
    # Larger weights than the init so attention is far from uniform.
    variables = jax.tree.map(lambda leaf: leaf * 3, tiny_variables)
    images = _images((2, 32, 32, 3))
    expected = _numpy_vit(variables['params'], images, 4, 4)
    np.testing.assert_allclose(_apply(model, variables, images), expected, atol=2e-4)
    explicit = _apply(model, variables, images, method='encode', return_attention=True)
    np.testing.assert_allclose(explicit['cls'], expected, atol=2e-4)


def test_encode_outputs(tiny_variables):
    model, variables = VisionTransformer(**TINY), tiny_variables
    images = _images((3, 32, 32, 3))
    features = _apply(model, variables, images, method='encode', n_last_blocks=2,
                      return_attention=True)
    attention = features['attention']
    assert attention.shape == (3, 4, 65, 65)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    assert len(features['blocks']) == 2
    assert all(block.shape == (3, 65, 32) for block in features['blocks'])
    cls = _apply(model, variables, images)
    np.testing.assert_allclose(features['cls'], cls, atol=1e-5)
    np.testing.assert_array_equal(features['blocks'][-1][:, 0], features['cls'])
    # Outputs of earlier blocks are normed too: zero mean per token.
    np.testing.assert_allclose(features['blocks'][0].mean(-1), 0.0, atol=1e-5)
    assert 'attention' not in _apply(model, variables, images, method='encode')
    with pytest.raises(ValueError, match='n_last_blocks'):
        _apply(model, variables, images, method='encode', n_last_blocks=3)


# ----------------------------------------------------------------- gradients, training


def _loss_and_grads(model, variables, images, **apply_kwargs):
    target = _images((images.shape[0], model.embed_dim), seed=7)

    def loss(params):
        out = model.apply({'params': params}, images, **apply_kwargs)
        return jnp.sum(out.astype(jnp.float32) * target)

    return jax.jit(jax.value_and_grad(loss))(variables['params'])


def test_frozen_leaves_get_exactly_zero_gradient(tiny_variables):
    model, variables = VisionTransformer(**TINY), tiny_variables
    _, grads = _loss_and_grads(model, variables, _images((2, 32, 32, 3)))
    frozen = set()
    for path, grad in _flat(grads).items():
        if is_frozen(path):
            frozen.add(path)
            np.testing.assert_array_equal(grad, 0.0)
        else:
            assert np.any(grad != 0), path
    assert frozen == {('pos_embed',), ('patch_embed', 'proj', 'kernel'),
                      ('patch_embed', 'proj', 'bias')}
    # Also with tree key entries and under a prefix, as an optimizer mask sees them.
    masked = jax.tree_util.tree_map_with_path(
        lambda path, _: is_frozen(path), {'backbone': variables['params']})
    assert sum(jax.tree.leaves(masked)) == 3
    assert not is_frozen(('blocks_0', 'attn', 'proj', 'kernel'))


def test_remat_gives_same_output_and_gradients(tiny_variables):
    variables = tiny_variables
    images = _images((2, 32, 32, 3))
    plain_loss, plain_grads = _loss_and_grads(VisionTransformer(**TINY), variables, images)
    remat_model = VisionTransformer(**TINY, remat=True)
    assert (jax.tree.map(jnp.shape, _abstract(remat_model))
            == jax.tree.map(jnp.shape, variables))
    remat_loss, remat_grads = _loss_and_grads(remat_model, variables, images)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 remat_grads, plain_grads)


def test_drop_path(tiny_variables):
    model, variables = VisionTransformer(**TINY, drop_path_rate=0.5), tiny_variables
    assert [block.drop_path_rate for block in model.bind(variables).blocks] == [0.0, 0.5]
    # Eight copies of one image: per-sample masks make copies differ from each other.
    images = jnp.repeat(_images((1, 32, 32, 3)), 8, axis=0)

    def train_forward(seed):
        return _apply(model, variables, images, train=True,
                      rngs={'dropout': jax.random.key(seed)})

    first, second = train_forward(1), train_forward(2)
    assert not np.allclose(first, second)
    assert not np.allclose(first, first[:1])
    np.testing.assert_array_equal(first, train_forward(1))
    evaluated = _apply(model, variables, images)
    np.testing.assert_array_equal(evaluated, _apply(model, variables, images))
    np.testing.assert_allclose(evaluated, evaluated[:1].repeat(8, axis=0), atol=1e-6)

    no_drop = VisionTransformer(**TINY)
    np.testing.assert_array_equal(_apply(no_drop, variables, images, train=True),
                                  _apply(no_drop, variables, images))


def test_bfloat16_compute_is_close_to_float32(tiny_variables):
    variables = tiny_variables
    images = _images((2, 32, 32, 3))
    reference = _apply(VisionTransformer(**TINY), variables, images)
    half_model = VisionTransformer(**TINY, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(_abstract(half_model)))
    half = _apply(half_model, variables, images)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), reference, atol=0.1)
    attention = _apply(half_model, variables, images, method='encode',
                       return_attention=True)['attention']
    np.testing.assert_allclose(attention.astype(jnp.float32).sum(-1), 1.0, atol=2e-2)


# ------------------------------------------------------------------------- projector


def test_projector_without_bn_matches_numpy():
    head = ProjectionHead(n_layers=2, hidden_dim=48, out_dim=16)
    x = _images((5, 24))
    variables = head.init(jax.random.key(0), x)
    assert set(variables) == {'params'}
    params = variables['params']
    assert set(params) == {'linear_0', 'linear_1'}
    assert params['linear_0']['kernel'].shape == (24, 48)
    kernel = np.asarray(params['linear_0']['kernel'])
    assert np.std(kernel) == pytest.approx(0.02, rel=0.1)
    assert not np.any(params['linear_0']['bias'])
    # Non-zero biases so the reference checks where they enter.
    params = jax.tree.map(lambda leaf: leaf + 0.05, params)
    p = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
    hidden = np.asarray(x, np.float64) @ p['linear_0']['kernel'] + p['linear_0']['bias']
    hidden = 0.5 * hidden * (1 + special.erf(hidden / np.sqrt(2)))  # exact GELU
    expected = hidden @ p['linear_1']['kernel'] + p['linear_1']['bias']
    np.testing.assert_allclose(head.apply({'params': params}, x), expected, atol=1e-6)
    relu = ProjectionHead(n_layers=2, hidden_dim=48, out_dim=16, activation='relu')
    assert not np.allclose(relu.apply({'params': params}, x), expected, atol=1e-4)


def test_projector_batch_norm_layout_and_updates():
    head = ProjectionHead(n_layers=3, hidden_dim=32, out_dim=8, use_bn=True)
    x = 3.0 + 2.0 * _images((16, 12))
    variables = head.init(jax.random.key(0), x)
    params, stats = variables['params'], variables['batch_stats']
    assert set(params) == {'linear_0', 'linear_1', 'linear_2', 'bn_0', 'bn_1'}
    assert set(params['bn_0']) == {'scale', 'bias'}
    assert set(stats) == {'bn_0', 'bn_1', 'bn_2'}  # bn_2: non-affine, buffers only

    out, updates = _apply(head, variables, x, train=True, mutable=('batch_stats',))
    # Train mode normalises with batch statistics; the last BN has no affine part.
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.var(0), 1.0, rtol=1e-2)
    new_stats = updates['batch_stats']
    hidden = x @ params['linear_0']['kernel'] + params['linear_0']['bias']
    # PyTorch momentum 0.1: running = 0.9 · running + 0.1 · batch.
    np.testing.assert_allclose(new_stats['bn_0']['mean'], 0.1 * hidden.mean(0), atol=1e-6)
    assert not np.allclose(new_stats['bn_2']['var'], stats['bn_2']['var'])
    # Eval uses the running averages and leaves them alone.
    evaluated = _apply(head, variables, x)
    assert not np.allclose(evaluated, out, atol=1e-3)

    no_last = ProjectionHead(n_layers=3, hidden_dim=32, out_dim=8, use_bn=True,
                             last_bn=False)
    assert set(no_last.init(jax.random.key(0), x)['batch_stats']) == {'bn_0', 'bn_1'}
    single = ProjectionHead(n_layers=1, out_dim=8).init(jax.random.key(0), x)
    assert single['params']['linear_0']['kernel'].shape == (12, 8)


def test_projector_rejects_unknown_activation():
    with pytest.raises(ValueError, match='gelu.*relu'):
        ProjectionHead(activation='swish').init(jax.random.key(0), jnp.zeros((2, 4)))
