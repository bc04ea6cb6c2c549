"""The ViT's two attention forms compute one function, and each backend gets its own.

'einsum' (`vit.attention_heads`, tuned for the CPU) and `jax.nn.dot_product_attention`
('xla'; 'cudnn' falls back to it for float32) must agree forward and backward in
float32, and the attention maps (evaluation, ContrastiveCrop) must not depend on the
form.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bam_jax.models import multicrop
from bam_jax.models.vit import VisionTransformer, self_attention
from configs import mnist, resnet50_imagenet

TINY = dict(patch_size=4, img_size=32, embed_dim=32, depth=2, num_heads=4)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _normal(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _assert_close_in_scale(actual, desired):
    """Equal to 1e-5 of the array's largest entry: through a ViT, float32 rounding of
    either form reaches ~1e-5 of that (checked against float64) on the smallest entries."""
    scale = float(np.abs(desired).max())
    np.testing.assert_allclose(actual, desired, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize('implementation', ['xla', 'cudnn'])
def test_forms_agree_forward_and_backward(implementation):
    # [B, T, 3, H, d]; scaled so the softmax is far from uniform (logits of ±10s).
    qkv = 3 * _normal((2, 17, 3, 4, 8), seed=0)
    cotangent = _normal((2, 17, 4, 8), seed=1)

    def output_and_grad(form):
        out, vjp = jax.vjp(lambda x: self_attention(x, form)[0], qkv)
        return out, vjp(cotangent)[0]

    einsum_out, einsum_grad = jax.jit(output_and_grad, static_argnums=0)('einsum')
    # On the CPU 'cudnn' must fall back to XLA for float32 (cuDNN would not even load).
    fused_out, fused_grad = jax.jit(output_and_grad, static_argnums=0)(implementation)
    assert einsum_out.shape == (2, 17, 4, 8) and einsum_grad.shape == qkv.shape
    np.testing.assert_allclose(fused_out, einsum_out, **TOLERANCE)
    np.testing.assert_allclose(fused_grad, einsum_grad, **TOLERANCE)
    # The grads of q, k and v are each non-trivial, so all three were compared.
    assert all(np.abs(einsum_grad[:, :, part]).max() > 0.1 for part in range(3))
    # Asked for the probabilities, every implementation computes the einsum form.
    fused_maps = jax.jit(lambda x: self_attention(x, implementation, True))(qkv)
    einsum_maps = jax.jit(lambda x: self_attention(x, 'einsum', True))(qkv)
    for fused, einsum in zip(fused_maps, einsum_maps):
        np.testing.assert_array_equal(fused, einsum)
    np.testing.assert_allclose(fused_maps[0], einsum_out, **TOLERANCE)
    assert fused_maps[1].shape == (2, 4, 17, 17) and float(fused_maps[1].max()) > 0.9


@pytest.fixture(scope='module')
def tiny_vits():
    """The same tiny ViT with each form, and its variables (weights ×2: peaked attention)."""
    models = {form: VisionTransformer(**TINY, attention_implementation=form)
              for form in ('einsum', 'xla')}
    variables = jax.jit(models['einsum'].init)(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    return models, jax.tree.map(lambda leaf: leaf * 2, variables)


def test_tiny_vit_forms_agree_forward_and_backward(tiny_vits):
    models, variables = tiny_vits
    images = _normal((3, 32, 32, 3), seed=2)
    target = _normal((3, TINY['embed_dim']), seed=3)

    def loss_and_grads(form):
        def loss(params):
            return jnp.sum(models[form].apply({'params': params}, images) * target)
        return jax.jit(jax.value_and_grad(loss))(variables['params'])

    (einsum_loss, einsum_grads), (xla_loss, xla_grads) = map(loss_and_grads,
                                                             ('einsum', 'xla'))
    np.testing.assert_allclose(xla_loss, einsum_loss, **TOLERANCE)
    flat_einsum, flat_xla = jax.tree.leaves(einsum_grads), jax.tree.leaves(xla_grads)
    assert len(flat_einsum) == len(flat_xla) > 20
    for einsum_leaf, xla_leaf in zip(flat_einsum, flat_xla):
        _assert_close_in_scale(xla_leaf, einsum_leaf)
    qkv_grad = einsum_grads['blocks_0']['attn']['qkv']['kernel']
    assert np.abs(qkv_grad).max() > 1e-3


def test_attention_maps_do_not_depend_on_the_form(tiny_vits):
    models, variables = tiny_vits
    images = _normal((2, 32, 32, 3), seed=4)
    features = {form: jax.jit(lambda v, x, model=model: model.apply(
                    v, x, return_attention=True, method=model.encode))(variables, images)
                for form, model in models.items()}
    maps = features['xla']['attention']
    assert maps.shape == (2, TINY['num_heads'], 65, 65)
    # Block 0 ran each form, so the last block's inputs differ by rounding only; the
    # einsum model's own float32 maps are 1.1e-5 from its float64 maps here.
    np.testing.assert_allclose(maps, features['einsum']['attention'], rtol=0, atol=2e-5)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert float(maps.max()) > 0.5  # peaked, so a change of form would show
    # The features that come with the maps are the plain forward's.
    plain = jax.jit(models['xla'].apply)(variables, images)
    _assert_close_in_scale(features['xla']['cls'], plain)


@pytest.mark.parametrize('name, platform, expected', [
    ('auto', 'cpu', 'einsum'), ('auto', 'tpu', 'xla'), ('auto', 'gpu', 'cudnn'),
    ('auto', 'cuda', 'cudnn'), ('dot_product_attention', 'cpu', 'xla'),
    ('dot_product_attention', 'tpu', 'xla'), ('einsum', 'tpu', 'einsum'),
    ('einsum', 'gpu', 'einsum')])
def test_attention_resolves_per_platform(name, platform, expected):
    config = ml_collections.ConfigDict({'model': {'attention': name}})
    assert multicrop.attention_implementation(config, platform) == expected


def test_auto_is_the_default_and_the_builder_passes_it_on():
    config = mnist.get_config()
    assert config.model.attention == 'auto'
    assert multicrop.build_network(config).backbone.attention_implementation == 'einsum'
    on_tpu = multicrop.build_network(config, platform='tpu').backbone
    assert on_tpu.attention_implementation == 'xla'
    # A run config written before the key existed is 'auto'.
    assert multicrop.attention_implementation(
        ml_collections.ConfigDict({'model': {'name': 'vit'}}), 'gpu') == 'cudnn'
    # Backbones without this attention take no such argument.
    assert multicrop.build_network(resnet50_imagenet.get_config(), platform='tpu')


def test_unknown_attention_is_one_line_naming_the_key():
    config = mnist.get_config()
    config.model.attention = 'flash'
    with pytest.raises(ValueError) as error:
        multicrop.build_network(config)
    assert str(error.value) == ("config.model.attention='flash': expected one of "
                                "['auto', 'einsum', 'dot_product_attention'].")
