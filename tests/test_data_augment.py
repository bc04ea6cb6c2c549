"""Device-side photometric augmentations: against PIL, per image, and mesh-independent."""

import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
import pytest

from bam_jax.data import augment
from configs import vit_small_imagenet
from conftest import data_mesh

MEAN, STD = np.asarray(augment.IMAGENET_MEAN), np.asarray(augment.IMAGENET_STD)


def _crops_config(**overrides):
    config = vit_small_imagenet.get_config().crops
    config.update({**dict(global_size=16, local_size=8, n_local=3), **overrides})
    return config


def _batch(batch_size=8, seed=0, n_local=2):
    rng = np.random.default_rng(seed)
    return {
        'global': rng.integers(0, 256, (2, batch_size, 16, 16, 3), dtype=np.uint8),
        'local': rng.integers(0, 256, (n_local, batch_size, 8, 8, 3), dtype=np.uint8),
        'seed': rng.integers(0, 2**32, (batch_size, 2), dtype=np.uint32),
        'index': np.arange(batch_size, dtype=np.int32),
    }


def _photo(seed=0, size=24):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([np.sin(rng.uniform(2, 9) * x + rng.uniform(2, 9) * y + c)
                      for c in range(3)], -1)
    return (127.5 * (1 + image)).astype(np.uint8)


def _float(image):
    return jnp.asarray(image, jnp.float32) / 255


@pytest.mark.parametrize('name, ours, pil', [
    ('brightness', augment.adjust_brightness, ImageEnhance.Brightness),
    ('contrast', augment.adjust_contrast, ImageEnhance.Contrast),
    ('saturation', augment.adjust_saturation, ImageEnhance.Color),
])
@pytest.mark.parametrize('factor', [0.6, 1.4])
def test_enhancements_match_pil(name, ours, pil, factor):
    image = _photo()
    expected = np.asarray(pil(Image.fromarray(image)).enhance(factor), np.float32) / 255
    got = np.asarray(ours(_float(image), factor))
    # PIL rounds to uint8 (and its contrast mean to an integer): within 1.5 levels.
    np.testing.assert_allclose(got, expected, atol=1.5 / 255)


def test_hue_matches_pil_hsv_rotation():
    image = _photo(1)
    hsv = np.asarray(Image.fromarray(image).convert('HSV'), np.int32)
    hsv[..., 0] = (hsv[..., 0] + round(0.1 * 255)) % 256
    expected = np.asarray(Image.frombytes('HSV', (24, 24), hsv.astype(np.uint8).tobytes())
                          .convert('RGB'))
    got = np.asarray(augment.adjust_hue(_float(image), 0.1)) * 255
    # PIL quantises hue to 256 steps; allow a few levels.
    assert np.mean(np.abs(got - expected)) < 2.0 and np.max(np.abs(got - expected)) < 8
    roundtrip = augment.hsv_to_rgb(augment.rgb_to_hsv(_float(image)))
    np.testing.assert_allclose(roundtrip, _float(image), atol=1e-5)


def test_blur_and_solarize():
    image = _float(_photo(2))
    blurred = augment.gaussian_blur(image, 1.5, half_width=6)
    assert jnp.allclose(augment.gaussian_blur(jnp.full((10, 10, 3), 0.3), 1.0, 4), 0.3)
    expected = np.asarray(Image.fromarray(_photo(2)).filter(ImageFilter.GaussianBlur(1.5)),
                          np.float32) / 255
    # PIL approximates the Gaussian by box blurs: compare in the interior.
    assert np.mean(np.abs(np.asarray(blurred) - expected)[4:-4, 4:-4]) < 2 / 255
    assert float(jnp.std(blurred)) < float(jnp.std(image))
    solarized = augment.solarize(_float(_photo(3)))
    expected = np.asarray(ImageOps.solarize(Image.fromarray(_photo(3)), 128), np.float32) / 255
    np.testing.assert_allclose(solarized, expected, atol=1e-6)


BATCH = _batch(batch_size=1000, n_local=2)
OFF = dict(jitter_prob=0.0, grayscale_prob=0.0, global_blur_prob=(0.0, 0.0),
           local_blur_prob=0.0, global_solarize_prob=(0.0, 0.0), local_solarize_prob=0.0)
PROBABILITIES = tuple(OFF)


@jax.jit
def _augment(batch, probabilities, rng):
    """`augment_crops` with the probabilities traced, so every test shares one compile."""
    config = types.SimpleNamespace(**{**_crops_config(n_local=2).to_dict(), **probabilities})
    return augment.augment_crops(batch, config, rng)


def _run(batch=BATCH, rng=0, **probabilities):
    official = {key: _crops_config()[key] for key in PROBABILITIES}
    probabilities = {key: jnp.asarray(value, jnp.float32)
                     for key, value in {**official, **probabilities}.items()}
    return jax.tree.map(np.asarray, _augment(batch, probabilities, jax.random.key(rng)))


def test_shapes_dtypes_ranges_and_pass_through():
    out = _run()
    assert out['global'].shape == (2, 1000, 16, 16, 3) and out['global'].dtype == np.float32
    assert out['local'].shape == (2, 1000, 8, 8, 3) and out['local'].dtype == np.float32
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    for name in ('global', 'local'):
        assert np.all(out[name] >= low - 1e-5) and np.all(out[name] <= high + 1e-5)
    np.testing.assert_array_equal(out['index'], BATCH['index'])
    assert not np.allclose(_run(rng=1)['global'], out['global'])


def test_each_augmentation_switched_on_alone():
    normalised = (BATCH['global'] / 255 - MEAN) / STD
    np.testing.assert_allclose(_run(**OFF)['global'], normalised, atol=1e-5)
    gray = _run(**{**OFF, 'grayscale_prob': 1.0})['global'] * STD + MEAN
    np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-5)
    solarized = _run(**{**OFF, 'global_solarize_prob': (0.0, 1.0)})['global']
    np.testing.assert_allclose(solarized[0], normalised[0], atol=1e-5)
    original = BATCH['global'][1] / 255
    np.testing.assert_allclose(solarized[1] * STD + MEAN,
                               np.where(original >= 128 / 255, 1 - original, original),
                               atol=1e-5)
    jittered = _run(**{**OFF, 'jitter_prob': 1.0})['global']
    assert np.all(np.abs(jittered - normalised).max(axis=(2, 3, 4)) > 0.05)


def test_official_probabilities_hold_over_many_images():
    """Blur 1 / 0.1 / 0.5, grayscale 0.2, solarise 0.2 on global 2 only, over 1,000 images."""
    pixels = {name: value * STD + MEAN for name, value in _run(jitter_prob=0.0).items()
              if name in ('global', 'local')}
    original = {name: BATCH[name] / 255 for name in pixels}
    gray = np.all(np.abs(pixels['global'][..., 0] - pixels['global'][..., 1]) < 1e-4,
                  axis=(2, 3))
    assert 0.16 < gray.mean() < 0.24
    solarized = np.where(original['global'] >= 128 / 255, 1 - original['global'],
                         original['global'])
    # Random pixels: blur or grayscale move every pixel's mean far from the original.
    untouched = {name: np.all(np.abs(pixels[name] - original[name]) < 1e-4, axis=(2, 3, 4))
                 for name in pixels}
    solarized_only = np.all(np.abs(pixels['global'] - solarized) < 1e-4, axis=(2, 3, 4))
    # σ < 0.2 moves no pixel by 1e-4: a blur that leaves the image untouched (≈ 5 %).
    def untouched_rate(blur_prob):
        return (1 - blur_prob + blur_prob * 0.1 / 1.9) * 0.8
    assert untouched['global'][0].mean() < 0.08  # global 1 is always blurred
    assert abs(untouched['global'][1].mean() - untouched_rate(0.1) * 0.8) < 0.04  # no solarise
    assert abs(untouched['local'].mean() - untouched_rate(0.5)) < 0.04
    assert abs(solarized_only[1].mean() - 0.2 * untouched_rate(0.1)) < 0.03
    assert not solarized_only[0].any()


def test_per_image_and_independent_of_the_mesh():
    batch = BATCH
    reference = _run(batch)
    # Permuting the images (with their seeds) permutes the outputs: no cross-image op.
    order = np.random.default_rng(0).permutation(len(batch['index']))
    permuted = {key: value[:, order] if key in ('global', 'local') else value[order]
                for key, value in batch.items()}
    out = _run(permuted)
    np.testing.assert_allclose(out['local'], reference['local'][:, order], atol=1e-6)
    # Sharded on the image axis, as in the train step: the same numbers on 4 devices.
    mesh = data_mesh(4)
    sharded = {key: jax.device_put(value, NamedSharding(
        mesh, P(None, 'data') if key in ('global', 'local') else P('data')))
        for key, value in batch.items()}
    official = {key: jnp.asarray(_crops_config()[key], jnp.float32) for key in PROBABILITIES}
    out = _augment(sharded, official, jax.random.key(0))
    assert out['global'].sharding.spec[1] == 'data'
    for name in ('global', 'local'):
        np.testing.assert_allclose(out[name], reference[name], atol=1e-5)


def _compiled(crops_config, batch):
    """The compiled augmentation of `batch` with `crops_config`'s (static) probabilities."""
    return jax.jit(lambda batch, rng: augment.augment_crops(batch, crops_config, rng)).lower(
        batch, jax.random.key(0)).compile()


def _cost(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost['flops'], cost['bytes accessed']


def test_augmentations_with_probability_zero_are_not_compiled():
    """The MNIST default (every probability 0) compiles to the normalisation alone."""
    batch = _batch(batch_size=8, n_local=3)
    off = _crops_config(**OFF)

    def normalise_only(batch, rng):
        del rng
        return {**batch, **{name: (batch[name].astype(jnp.float32) / 255 - jnp.asarray(MEAN))
                            / jnp.asarray(STD) for name in ('global', 'local')}}

    normalised = jax.jit(normalise_only).lower(batch, jax.random.key(0)).compile()
    compiled = _compiled(off, batch)
    assert _cost(compiled) == _cost(normalised)
    assert 'while' not in compiled.as_text() and 'sine' not in compiled.as_text()
    # The official augmentations (XLA's estimate before optimisation) cost >20× more.
    official = jax.jit(lambda batch, rng: augment.augment_crops(batch, _crops_config(), rng))
    assert official.lower(batch, jax.random.key(0)).cost_analysis()['flops'] > (
        20 * _cost(compiled)[0])
    out = compiled(batch, jax.random.key(0))
    for name in ('global', 'local'):
        np.testing.assert_array_equal(out[name], normalised(batch, jax.random.key(0))[name])


@pytest.mark.parametrize('probabilities', [
    {},  # the official ones: every augmentation compiled, as before
    dict(OFF, grayscale_prob=0.3, global_solarize_prob=(0.0, 0.5)),  # some left out
], ids=['official', 'mixed'])
def test_static_probabilities_keep_the_random_stream(probabilities):
    """Leaving out the zero-probability ops draws nothing else differently: the outputs
    equal those with every op compiled (the probabilities traced, as in `_run`)."""
    static = _crops_config(n_local=2, **probabilities)
    out = _compiled(static, BATCH)(BATCH, jax.random.key(0))
    traced = _run(**probabilities)
    for name in ('global', 'local'):
        # XLA rewrites divisions by constants as products by reciprocals in some fusions
        # and not others: different graphs (probabilities static or traced) differ by an
        # ulp or two (measured 8e-7). Any other draw would move pixels by >1e-2.
        np.testing.assert_allclose(out[name], traced[name], rtol=0, atol=2e-6)
