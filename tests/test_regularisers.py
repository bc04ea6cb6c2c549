"""Fine-tuning's regularisers against timm on the same inputs and the same random numbers:
mixup / CutMix with label smoothing (`bam_jax.data.mixup`, timm's `Mixup`) and random
erasing (`bam_jax.data.random_erasing`, timm's `RandomErasing`).

The numbers are drawn in JAX; one child process (timm, no TensorFlow) runs every case
with numpy's and Python's random functions replaced by ones that return those numbers in
the order timm asks for them, and with the erasing noise taken from the same array.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bam_jax.data import mixup, random_erasing
from conftest import timm_child

BATCH, HEIGHT, WIDTH, CLASSES = 8, 16, 20, 10

# Mixup: numpy.random.rand / beta / randint return the queued numbers (`beta` with a
# size, as mode 'elem' calls it twice, returns the chosen λ both times and np.where
# keeps it). Random erasing: `random` is replaced in timm's module, `randint(a, b)` is
# a + floor(u·(b - a + 1)) of the queued uniform, and `_get_pixels` cuts the fill array.
TIMM_REGULARISERS = r'''
import json, sys
import numpy as np
import torch
from timm.data import mixup as timm_mixup, random_erasing as timm_erasing

jobs_path, arrays_path, out_path = sys.argv[1:4]
arrays = dict(np.load(arrays_path))
outputs = {}
nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
nhwc = lambda x: x.numpy().transpose(0, 2, 3, 1)
for job in json.load(open(jobs_path)):
    name = job['name']
    images = nchw(arrays[name + '/images'])
    if job['kind'] == 'mixup':
        rand, beta, randint = list(job['rand']), list(job['beta']), list(job['randint'])
        np.random.rand = lambda *size: (np.array([rand.pop(0) for _ in range(size[0])])
                                        if size else rand.pop(0))
        np.random.beta = lambda a, b, size=None: (np.array(job['beta'], np.float64)
                                                  if size else beta.pop(0))
        np.random.randint = lambda low, high, size=None: randint.pop(0)
        mixed, targets = timm_mixup.Mixup(**job['settings'])(
            images, torch.from_numpy(arrays[name + '/labels']).long())
        assert not (rand or randint or (beta and job['settings']['mode'] == 'batch')), name
        outputs[name + '/images'], outputs[name + '/targets'] = nhwc(mixed), targets.numpy()
        continue
    erasing = timm_erasing.RandomErasing(device='cpu', **job['settings'])
    fill = nchw(arrays[name + '/fill'])
    for i, numbers in enumerate(job['draws']):
        uniforms, corner, placed = list(numbers['uniform']), list(numbers['corner']), []

        class Random:
            random = staticmethod(lambda: numbers['erase'])
            uniform = staticmethod(lambda low, high: uniforms.pop(0))

            @staticmethod
            def randint(low, high):
                placed.append(low + int(corner.pop(0) * (high - low + 1)))
                return placed[-1]

        def pixels(per_pixel, rand_color, size, dtype, device):
            (top, left), (_, h, w) = placed, size
            return fill[i] if fill.shape[-1] == 1 else fill[i][:, top:top + h, left:left + w]

        timm_erasing.random, timm_erasing._get_pixels = Random, pixels
        erasing(images[i])
    outputs[name + '/images'] = nhwc(images)
np.savez(out_path, **outputs)
json.dump({'tensorflow_imported': 'tensorflow' in sys.modules}, open(out_path + '.json', 'w'))
'''


def mixup_job(name, settings, seed):
    """(JAX images, targets, timm job, arrays) of one mixup case."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
    draws = jax.device_get(mixup.draw(jax.random.key(seed), images.shape, settings))
    mixed, targets = jax.jit(mixup.apply, static_argnums=3)(images, labels, draws, settings)
    applied, cutmix, lam, centre = (np.asarray(v) for v in
                                    mixup.per_image(draws, settings, BATCH))
    switches = settings.mixup_alpha > 0 and settings.cutmix_alpha > 0  # else no switch draw
    if settings.mode == 'batch':  # rand: apply, then (if applied) switch
        rand = [draws.apply_uniform[0]] + ([draws.switch_uniform[0]]
                                           if applied[0] and switches else [])
        beta = [draws.lam[0]] if applied[0] else []
        rows = [0] if applied[0] and cutmix[0] else []
    else:  # rand(n): switch, then apply; a box per mixed CutMix row, in order
        rand = list(draws.switch_uniform) * switches + list(draws.apply_uniform)
        beta = list(draws.lam)
        rows = [i for i in range(len(draws.lam)) if applied[i] and cutmix[i]]
    job = {'name': name, 'kind': 'mixup', 'rand': [float(v) for v in rand],
           'beta': [float(v) for v in beta],
           'randint': [int(v) for i in rows for v in draws.centre[i]],
           'settings': {**dataclasses.asdict(settings), 'cutmix_minmax': None}}
    arrays = {f'{name}/images': images, f'{name}/labels': labels}
    return (np.asarray(mixed), np.asarray(targets), (applied, cutmix, lam)), job, arrays


def erasing_job(name, settings, seed, batch=12):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, HEIGHT + 8, WIDTH, 3)).astype(np.float32)
    draws = jax.device_get(random_erasing.draw(jax.random.key(seed), images.shape, settings))
    erased = jax.jit(random_erasing.apply, static_argnums=2)(images, draws, settings)
    per_image = [{'erase': float(draws.erase_uniform[i]),
                  'uniform': [float(v) for pair in zip(draws.area[i], draws.log_aspect[i])
                              for v in pair],
                  'corner': [float(v) for v in draws.corner_uniform[i]]}
                 for i in range(batch)]
    timm_settings = {'probability': settings.probability, 'min_area': settings.min_area,
                     'max_area': settings.max_area, 'min_aspect': settings.min_aspect,
                     'mode': settings.mode}
    job = {'name': name, 'kind': 'erasing', 'draws': per_image, 'settings': timm_settings}
    arrays = {f'{name}/images': images, f'{name}/fill': np.asarray(draws.fill, np.float32)}
    boxes = random_erasing.boxes(draws, HEIGHT + 8, WIDTH, settings)
    return (np.asarray(erased), images, np.asarray(boxes[0])), job, arrays


DEIT = mixup.MixupSettings(num_classes=CLASSES)
MIXUP_CASES = {f'deit_batch_{seed}': (DEIT, seed) for seed in range(6)}
MIXUP_CASES.update({
    'half_batch': (dataclasses.replace(DEIT, prob=0.5), 11),  # applied: mixup
    'half_batch_off': (dataclasses.replace(DEIT, prob=0.5), 9),  # not applied
    'pair': (dataclasses.replace(DEIT, mode='pair', prob=0.7), 7),
    'elem': (dataclasses.replace(DEIT, mode='elem', prob=0.7), 8),
    'cutmix_only': (dataclasses.replace(DEIT, mixup_alpha=0.0, correct_lam=False), 10),
})
ERASING_CASES = {
    'deit_pixel': (random_erasing.ErasingSettings(probability=0.5), 0),
    'rand': (random_erasing.ErasingSettings(probability=0.5, mode='rand'), 1),
    'const': (random_erasing.ErasingSettings(probability=0.5, mode='const'), 2),
    # Boxes of 85-99 % of the image: attempts often do not fit, sometimes none does.
    'few_fit': (random_erasing.ErasingSettings(probability=1.0, min_area=0.85,
                                               max_area=0.99), 3),
}


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
    """{case: (ours, timm's, extra)}: every case through one timm child."""
    ours, jobs, arrays = {}, [], {}
    for name, (settings, seed) in MIXUP_CASES.items():
        ours[name], job, more = mixup_job(name, settings, seed)
        jobs.append(job)
        arrays.update(more)
    for name, (settings, seed) in ERASING_CASES.items():
        ours[name], job, more = erasing_job(name, settings, seed)
        jobs.append(job)
        arrays.update(more)
    timm, _ = timm_child(TIMM_REGULARISERS, jobs, arrays, tmp_path_factory.mktemp('timm'))
    return ours, timm


def test_mixup_and_cutmix_equal_timms(compared):
    ours, timm = compared
    seen = set()
    for name in MIXUP_CASES:
        (images, targets, (applied, cutmix, lam)), theirs = ours[name], timm
        # Equal on the development CPU (targets within 3e-8); a blend may round apart in
        # the last bit elsewhere (timm takes 1 - λ in float64; XLA may fuse the FMA).
        np.testing.assert_allclose(images, theirs[f'{name}/images'], rtol=0, atol=2e-6,
                                   err_msg=name)
        np.testing.assert_allclose(targets, theirs[f'{name}/targets'], rtol=0, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
        seen |= {('cutmix' if c else 'mixup') if a else 'none'
                 for a, c in zip(applied, cutmix)}
        assert targets.min() >= 0.1 / CLASSES - 1e-7  # smoothing's floor
    assert seen == {'cutmix', 'mixup', 'none'}  # every branch was compared


def test_random_erasing_equals_timms(compared):
    ours, timm = compared
    for name in ERASING_CASES:
        (erased, original, erase), theirs = ours[name], timm[f'{name}/images']
        np.testing.assert_array_equal(erased, theirs, err_msg=name)
        changed = (erased != original).any(axis=(1, 2, 3))
        assert changed.tolist() == erase.tolist()
        assert 0 < changed.sum() < len(changed), name  # both branches in every case


def test_draws_follow_the_settings():
    """The distributions that the forced comparisons take as given."""
    settings = dataclasses.replace(DEIT, mode='elem')
    draws = mixup.draw(jax.random.key(0), (4000, HEIGHT, WIDTH, 3), settings)
    cutmix = mixup.per_image(draws, settings, 4000)[1]
    assert abs(float(jnp.mean(cutmix)) - 0.5) < 0.03
    # Beta(α, α) has mean 1/2 and variance 1 / (4(2α + 1)).
    for chosen, alpha in ((cutmix, 1.0), (~cutmix, 0.8)):
        lam = np.asarray(draws.lam)[np.asarray(chosen)]
        assert abs(lam.mean() - 0.5) < 0.03
        assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.01
    centre = np.asarray(draws.centre)
    assert centre.min(axis=0).tolist() == [0, 0]
    assert centre.max(axis=0).tolist() == [HEIGHT - 1, WIDTH - 1]
    erasing = random_erasing.draw(jax.random.key(1), (4000, HEIGHT, WIDTH, 3),
                                  random_erasing.ErasingSettings())
    assert abs(float(jnp.mean(erasing.erase_uniform <= 0.25)) - 0.25) < 0.03
    assert abs(float(jnp.std(erasing.fill)) - 1) < 0.01
