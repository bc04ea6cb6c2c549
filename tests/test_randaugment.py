"""RandAugment (`bam_jax.data.randaugment`) against timm's, as DeiT builds it.

One timm child takes the RandAugment out of `create_transform(..., auto_augment=
'rand-m9-mstd0.5-inc1', interpolation='bicubic')` (DeiT's call), reports its settings, and
runs every case with numpy's op choice and Python's `random` / `gauss` replaced by ones that
return our draws in the order timm asks for them.
"""

import dataclasses

import numpy as np
import pytest

from bam_jax.data import randaugment
from bam_jax.data.randaugment import OPS, SIGNED, Draws, RandAugmentSettings
from conftest import timm_child

DEIT = RandAugmentSettings()
# Magnitudes hit through the noise (9 + 0.5 z, clipped): 0 (clipped), 3.3, 9, 10 (clipped).
TARGETS = (-20.0, -11.4, 0.0, 3.0)

TIMM_RANDAUGMENT = r'''
import json, sys
import numpy as np
from timm.data import auto_augment, create_transform

jobs_path, arrays_path, out_path = sys.argv[1:4]
arrays = dict(np.load(arrays_path))
pipeline = create_transform(224, is_training=True, color_jitter=0.3,
                            auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
                            re_prob=0.25, re_mode='pixel', re_count=1)
policy = next(t for t in pipeline.transforms if isinstance(t, auto_augment.RandAugment))
first = policy.ops[0]
report = {'ops': [op.name for op in policy.ops], 'num_layers': policy.num_layers,
          'prob': first.prob, 'magnitude': first.magnitude,
          'magnitude_std': first.magnitude_std, 'kwargs': [
              list(first.kwargs['fillcolor']), int(first.kwargs['resample'])],
          'same': all(op.kwargs == first.kwargs and op.prob == first.prob
                      and op.magnitude == first.magnitude for op in policy.ops)}
outputs = {}
for job in json.load(open(jobs_path)):
    uniforms, normals = list(job['random']), list(job['gauss'])

    class Random:
        random = staticmethod(lambda: uniforms.pop(0))
        gauss = staticmethod(lambda mu, sigma: mu + normals.pop(0) * sigma)

    auto_augment.random = Random
    np.random.choice = lambda ops, size, replace=True, p=None: [ops[i] for i in job['ops']]
    image = auto_augment.Image.fromarray(arrays[job['image']])
    outputs[job['name']] = np.asarray(policy(image))
    assert not uniforms and not normals, job['name']
np.savez(out_path, **outputs)
report['tensorflow_imported'] = 'tensorflow' in sys.modules
json.dump(report, open(out_path + '.json', 'w'))
'''


def sample_images():
    """Smooth colour images with edges, one square (DeiT's 224) and one not."""
    rng = np.random.default_rng(0)
    images = {}
    for name, (height, width) in {'square': (224, 224), 'wide': (48, 80)}.items():
        rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
        channels = [np.sin(6 * rows + 3 * c) * np.cos(5 * cols - c) for c in range(3)]
        image = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
        image[height // 3:height // 2, width // 4:width // 2] = (250, 20, 60)
        images[name] = np.clip(image, 0, 255).astype(np.uint8)
    return images


def timm_job(name, image, draws, settings=DEIT):
    """The numbers timm asks for, in its order: per op `random()` (apply?), then if
    applied `gauss`, then if signed `random()` (negate?)."""
    uniforms, normals = [], []
    for index, op in enumerate(draws.ops):
        uniforms.append(float(draws.apply_uniform[index]))
        if draws.apply_uniform[index] > settings.prob:
            continue
        normals.append(float(draws.magnitude_normal[index]))
        if OPS[op] in SIGNED:
            uniforms.append(float(draws.sign_uniform[index]))
    return {'name': name, 'image': image, 'ops': [int(op) for op in draws.ops],
            'random': uniforms, 'gauss': normals}


def cases():
    """{name: (image name, draws)}: every op alone at 4 magnitudes and both signs (the
    second op is drawn but not applied), then the full policy on drawn numbers."""
    found = {}
    for op, name in enumerate(OPS):
        for target in TARGETS:
            for sign in (0.2, 0.8):
                image = 'wide' if sign > 0.5 else 'square'
                found[f'{name}_{target}_{sign}'] = (image, Draws(
                    ops=np.array([op, (op + 5) % len(OPS)]),
                    apply_uniform=np.array([0.3, 0.7]),
                    magnitude_normal=np.array([target, 0.0]),
                    sign_uniform=np.array([sign, 0.1])))
    rng = np.random.default_rng(1)
    for index in range(40):
        found[f'policy_{index}'] = ('wide' if index % 4 else 'square',
                                    randaugment.draw(rng, DEIT))
    return found


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
    images = sample_images()
    ours, jobs = {}, []
    for name, (image, draws) in cases().items():
        ours[name] = (randaugment.apply(images[image], draws, DEIT), images[image])
        jobs.append(timm_job(name, image, draws))
    timm, report = timm_child(TIMM_RANDAUGMENT, jobs, images,
                              tmp_path_factory.mktemp('timm'))
    return ours, timm, report


def test_settings_are_deits(compared):
    _, _, report = compared
    assert report['ops'] == list(OPS)
    assert report['same']
    assert (report['num_layers'], report['prob'], report['magnitude'],
            report['magnitude_std']) == (DEIT.num_ops, DEIT.prob, DEIT.magnitude,
                                         DEIT.magnitude_std)
    assert report['kwargs'] == [list(DEIT.fill), int(DEIT.resample)]
    assert randaugment.parse('rand-m9-mstd0.5-inc1') == DEIT
    with pytest.raises(ValueError, match='increasing'):
        randaugment.parse('rand-m9-mstd0.5')


def test_every_op_equals_timms(compared):
    ours, timm, _ = compared
    changed = set()
    for name in ours:
        if name.startswith('policy'):
            continue
        image, original = ours[name]
        np.testing.assert_array_equal(image, timm[name], err_msg=name)
        if not np.array_equal(image, original):
            changed.add(name.split('_')[0])
    assert changed == set(OPS)  # every op did something at some magnitude


def test_policy_equals_timms(compared):
    ours, timm, _ = compared
    unchanged = 0
    for name in ours:
        if name.startswith('policy'):
            image, original = ours[name]
            np.testing.assert_array_equal(image, timm[name], err_msg=name)
            unchanged += np.array_equal(image, original)
    assert 0 < unchanged < 20  # both ops skipped: 1/4 of the images


def test_draws_follow_the_settings():
    """What the forced comparison takes as given: the distributions of the draws."""
    rng = np.random.default_rng(2)
    draws = [randaugment.draw(rng, DEIT) for _ in range(4000)]
    ops = np.concatenate([d.ops for d in draws])
    assert np.bincount(ops, minlength=len(OPS)).min() > 0.8 * len(ops) / len(OPS)
    applied = np.concatenate([d.apply_uniform for d in draws]) <= DEIT.prob
    assert abs(applied.mean() - 0.5) < 0.02
    magnitudes = [randaugment.magnitude(d, 0, DEIT) for d in draws]
    assert abs(np.mean(magnitudes) - 9.0) < 0.03 and abs(np.std(magnitudes) - 0.5) < 0.03
    fixed = dataclasses.replace(DEIT, magnitude_std=0.0)
    assert randaugment.magnitude(draws[0], 1, fixed) == 9.0
