"""RandAugment as DeiT fine-tunes with it: timm's `rand-m9-mstd0.5-inc1`.

Per image, on the host, on the uint8 crop before normalisation: two ops chosen uniformly
with replacement from timm's 15 "increasing" ops, each applied with probability 0.5 at a
magnitude drawn from N(9, 0.5²) and clipped to [0, 10]; the signed ops (rotate, shear,
translate, and the enhance ops, which move away from 1 in either direction) flip their sign
with probability 1/2. Geometric ops resample bicubic with the ImageNet mean as fill
(DeiT's `interpolation='bicubic'`, timm's `img_mean`).

The randomness is split from the work: `draw(rng, settings)` takes every number from a
numpy `Generator` (so the result does not depend on which worker runs it), and
`apply(image, draws, settings)` is a pure function of the image and those numbers. timm
draws the same quantities from Python's `random` and numpy's global generator, in this
order per op: apply?, magnitude, sign; `tests/test_randaugment.py` hands timm our numbers
and gets the same pixels. The pixel work is PIL's, with the arguments timm passes; the
lookup tables (invert, posterize, solarize) are built here.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# timm `_RAND_INCREASING_TRANSFORMS`, in its order (an op index is a position here).
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
       'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
       'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
       'TranslateYRel')
# Ops whose argument takes a random sign (timm `_randomly_negate`).
SIGNED = frozenset({'Rotate', 'ColorIncreasing', 'ContrastIncreasing',
                    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
                    'TranslateXRel', 'TranslateYRel'})
LEVEL_DENOM = 10.0  # timm `_LEVEL_DENOM`: magnitude 10 is an op's full strength
IMAGENET_MEAN_UINT8 = tuple(min(255, round(255 * x)) for x in (0.485, 0.456, 0.406))
_ENHANCERS = {'ColorIncreasing': ImageEnhance.Color,
              'ContrastIncreasing': ImageEnhance.Contrast,
              'BrightnessIncreasing': ImageEnhance.Brightness,
              'SharpnessIncreasing': ImageEnhance.Sharpness}


@dataclasses.dataclass(frozen=True)
class RandAugmentSettings:
    """timm's `rand_augment_transform` arguments; the defaults are DeiT's.

    Attributes:
      magnitude: the 'm' of the config string, 0-10.
      num_ops: ops per image ('n').
      prob: probability of applying each chosen op ('p').
      magnitude_std: std of the Gaussian noise on the magnitude ('mstd'); 0 for none.
      magnitude_max: the magnitude's upper clip ('mmax', timm's default 10).
      translate_pct: the largest translation, as a fraction of the side.
      fill: the RGB fill of pixels that geometric ops bring in (timm `img_mean`).
      resample: PIL's resampling of geometric ops (DeiT: bicubic).
    """
    magnitude: float = 9.0
    num_ops: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.5
    magnitude_max: float = LEVEL_DENOM
    translate_pct: float = 0.45
    fill: tuple[int, ...] = IMAGENET_MEAN_UINT8
    resample: int = Image.Resampling.BICUBIC


def parse(config_str: str, **overrides) -> RandAugmentSettings:
    """Settings of a timm config string of the 'increasing' ops, e.g. 'rand-m9-mstd0.5-inc1'
    ('m', 'n', 'p', 'mstd', 'mmax'); other op sets are not implemented."""
    sections = config_str.split('-')
    if sections[0] != 'rand':
        raise ValueError(f'not a RandAugment config: {config_str!r}')
    values = {}
    names = {'m': 'magnitude', 'n': 'num_ops', 'p': 'prob', 'mstd': 'magnitude_std',
             'mmax': 'magnitude_max', 'inc': 'inc'}
    for section in sections[1:]:
        match = re.fullmatch(r'([a-z]+)(\d.*)', section)
        if not match or match[1] not in names:
            raise ValueError(f'unknown RandAugment section {section!r} in {config_str!r}')
        values[names[match[1]]] = float(match[2])
    if values.pop('inc', 0.0) != 1.0:
        raise ValueError(f'only the increasing ops (inc1) are implemented: {config_str!r}')
    if values.get('magnitude_std', 0.0) > 100:
        raise ValueError('uniform magnitudes (mstd > 100) are not implemented')
    if 'num_ops' in values:
        values['num_ops'] = int(values['num_ops'])
    return RandAugmentSettings(**{**values, **overrides})


@dataclasses.dataclass(frozen=True)
class Draws:
    """One image's random numbers, one entry per chosen op.

    Attributes:
      ops: indices into `OPS`.
      apply_uniform: U[0, 1); the op applies unless it is above `prob` (timm's test).
      magnitude_normal: N(0, 1); the magnitude is `magnitude + magnitude_std ·` it.
      sign_uniform: U[0, 1); a signed op's argument is negated if it is above 0.5.
    """
    ops: np.ndarray
    apply_uniform: np.ndarray
    magnitude_normal: np.ndarray
    sign_uniform: np.ndarray


def draw(rng: np.random.Generator, settings: RandAugmentSettings) -> Draws:
    n = settings.num_ops
    return Draws(ops=rng.integers(0, len(OPS), n), apply_uniform=rng.random(n),
                 magnitude_normal=rng.standard_normal(n), sign_uniform=rng.random(n))


def magnitude(draws: Draws, index: int, settings: RandAugmentSettings) -> float:
    """The clipped magnitude of chosen op `index` (timm's `AugmentOp.__call__`)."""
    value = settings.magnitude
    if settings.magnitude_std > 0:
        value = value + settings.magnitude_std * float(draws.magnitude_normal[index])
    return max(0.0, min(value, settings.magnitude_max))


def op_argument(name: str, level: float, negate: bool,
                settings: RandAugmentSettings) -> float | int | None:
    """timm's `LEVEL_TO_ARG` of the increasing ops, `level` in [0, 10]."""
    fraction = level / LEVEL_DENOM
    sign = -1.0 if negate and name in SIGNED else 1.0
    if name in ('AutoContrast', 'Equalize', 'Invert'):
        return None
    if name == 'Rotate':
        return sign * fraction * 30.0
    if name == 'PosterizeIncreasing':
        return 4 - int(fraction * 4)  # bits kept
    if name == 'SolarizeIncreasing':
        return 256 - min(256, int(fraction * 256))  # threshold
    if name == 'SolarizeAdd':
        return min(128, int(fraction * 110))  # added below 128
    if name in _ENHANCERS:
        return max(0.1, 1.0 + sign * fraction * 0.9)  # blend factor
    if name in ('ShearX', 'ShearY'):
        return sign * fraction * 0.3
    return sign * fraction * settings.translate_pct  # TranslateXRel / YRel


def _lookup(image: Image.Image, table: np.ndarray) -> Image.Image:
    """The same 256-entry table on every channel (PIL's `point`, as `ImageOps` does)."""
    return image.point(table.astype(np.uint8).tolist() * len(image.getbands()))


def apply_op(image: Image.Image, name: str, argument, settings: RandAugmentSettings
             ) -> Image.Image:
    """One op on an RGB PIL image, with its argument from `op_argument`."""
    values = np.arange(256)
    if name == 'AutoContrast':
        return ImageOps.autocontrast(image)
    if name == 'Equalize':
        return ImageOps.equalize(image)
    if name == 'Invert':
        return _lookup(image, 255 - values)
    if name == 'PosterizeIncreasing':
        if argument >= 8:
            return image
        return _lookup(image, values & ~(2 ** (8 - argument) - 1))
    if name == 'SolarizeIncreasing':
        return _lookup(image, np.where(values < argument, values, 255 - values))
    if name == 'SolarizeAdd':
        return _lookup(image, np.where(values < 128, np.minimum(255, values + argument),
                                       values))
    if name in _ENHANCERS:
        return _ENHANCERS[name](image).enhance(argument)
    geometry = dict(resample=settings.resample, fillcolor=settings.fill)
    if name == 'Rotate':
        return image.rotate(argument, **geometry)
    width, height = image.size
    matrix = {'ShearX': (1, argument, 0, 0, 1, 0), 'ShearY': (1, 0, 0, argument, 1, 0),
              'TranslateXRel': (1, 0, argument * width, 0, 1, 0),
              'TranslateYRel': (1, 0, 0, 0, 1, argument * height)}[name]
    return image.transform(image.size, Image.Transform.AFFINE, matrix, **geometry)


def apply(image: np.ndarray, draws: Draws, settings: RandAugmentSettings) -> np.ndarray:
    """The augmented uint8 `[H, W, 3]` image: the chosen ops in order, each if drawn."""
    pil = Image.fromarray(np.asarray(image, np.uint8))
    for index, op in enumerate(draws.ops):
        if settings.prob < 1.0 and draws.apply_uniform[index] > settings.prob:
            continue
        name = OPS[int(op)]
        argument = op_argument(name, magnitude(draws, index, settings),
                               draws.sign_uniform[index] > 0.5, settings)
        pil = apply_op(pil, name, argument, settings)
    return np.asarray(pil)


def rand_augment(image: np.ndarray, rng: np.random.Generator,
                 settings: RandAugmentSettings = RandAugmentSettings()) -> np.ndarray:
    """`apply(image, draw(rng, settings), settings)`."""
    return apply(image, draw(rng, settings), settings)
