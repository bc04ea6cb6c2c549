"""DAVIS-2017 video object segmentation: J&F on crafted masks and against scikit-image,
the propagation against a NumPy transcription of DINO's, on videos generated here
(`user_data.make_davis`, DAVIS's layout, and `make_tfds_davis`, TFDS's), and `python -m
bam_jax.evaluate --config.protocols=davis` as users run it.
"""

import concurrent.futures
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from bam_jax.data.sources import DataError
from bam_jax.evaluate import davis, jandf, runner
from bam_jax.models.vit import vit
from configs import evaluate as evaluate_config
from configs import mnist
from conftest import REPO, TINY, data_mesh, environment
import user_data

# ------------------------------------------------------------------ J&F


def square(shape=(60, 80), top=10, left=10, side=20):
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_j_and_f_of_crafted_masks():
    a = square()
    assert jandf.region_similarity(a, a) == 1 and jandf.boundary_measure(a, a) == 1
    far = square(top=35, left=50)
    assert jandf.region_similarity(a, far) == 0 and jandf.boundary_measure(a, far) == 0
    # A square shifted by d along x: IoU (s - d) / (s + d).
    assert jandf.region_similarity(a, square(left=15)) == pytest.approx(15 / 25)
    # The tolerance of a 60×80 image is ceil(0.008 · 100) = 1 pixel: a one-pixel shift of
    # the boundary is matched, a three-pixel one only where the edges stay.
    assert jandf.boundary_radius((60, 80)) == 1
    assert jandf.boundary_measure(a, square(left=11)) == 1
    assert jandf.boundary_measure(a, square(left=13)) < 0.6
    empty = np.zeros_like(a)
    assert jandf.region_similarity(empty, empty) == 1 and jandf.boundary_measure(empty,
                                                                                  empty) == 1
    assert jandf.region_similarity(a, empty) == 0 and jandf.boundary_measure(a, empty) == 0


def test_statistics_and_sequence_scores_leave_out_first_and_last_frames():
    stats = jandf.statistics(np.array([1.0, 1.0, 0.4, 0.4, 0.2, 0.2, 0.2, 0.2]))
    # Quarters over 8 frames: indices 0-2, 2-4, 4-5, 5-7 (each with its end index).
    assert stats == pytest.approx({'mean': 0.45, 'recall': 0.25, 'decay': 0.8 - 0.2})
    truth = np.stack([square(left=10 + t) * 1 + square(top=35, left=50) * 2
                      for t in range(6)]).astype(np.uint8)
    prediction = truth.copy()
    prediction[0], prediction[-1] = 0, 2  # not scored
    scores = jandf.score_sequence(truth, prediction)
    assert scores['J'] == scores['F'] == scores['J&F'] == 1 and len(scores['objects']) == 2
    prediction[2] = np.where(prediction[2] == 2, 0, prediction[2])  # object 2 lost once
    objects = jandf.score_sequence(truth, prediction)['objects']
    assert objects[0]['J']['mean'] == 1 and objects[1]['J']['mean'] == 0.75
    assert jandf.global_scores({'s': jandf.score_sequence(truth, prediction)})[
        'J-Mean'] == pytest.approx(0.875)
    with pytest.raises(ValueError, match='index 3, above the 2 objects'):
        jandf.score_sequence(truth, np.full_like(truth, 3))


def skimage_dilation(mask, radius):
    from skimage.morphology import dilation, disk
    return dilation(mask.astype(np.uint8), disk(radius)) > 0


def skimage_f_measure(truth, prediction, bound_th=0.008):
    """The toolkit's F written independently: boundaries pixel by pixel, dilation by
    scikit-image."""

    def boundary(mask):
        height, width = mask.shape
        out = np.zeros_like(mask)
        for y in range(height):
            for x in range(width):
                neighbours = [(y, x + 1), (y + 1, x), (y + 1, x + 1)]
                if y == height - 1 and x == width - 1:
                    continue
                if y == height - 1:
                    neighbours = [(y, x + 1)]
                elif x == width - 1:
                    neighbours = [(y + 1, x)]
                out[y, x] = any(
                    mask[y, x] != (mask[j, i] if j < height and i < width else False)
                    for j, i in neighbours)
        return out

    radius = np.ceil(bound_th * np.linalg.norm(truth.shape))
    t, p = boundary(truth), boundary(prediction)
    if not t.any() or not p.any():
        return float(not t.any() and not p.any())
    precision = (p & skimage_dilation(t, radius)).sum() / p.sum()
    recall = (t & skimage_dilation(p, radius)).sum() / t.sum()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_f_measure_equals_a_scikit_image_implementation():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:90, 0:130]  # diagonal 158 → a 2-pixel tolerance
    for _ in range(6):
        blobs = [((y - rng.uniform(0, 90)) ** 2 + (x - rng.uniform(0, 130)) ** 2
                  < rng.uniform(40, 500)) for _ in range(2)]
        noisy = blobs[0] ^ (rng.random(blobs[0].shape) < 0.02)
        for truth, prediction in ((blobs[0], blobs[1]), (blobs[0], noisy)):
            assert jandf.boundary_measure(truth, prediction) == pytest.approx(
                skimage_f_measure(truth, prediction))
    mask = rng.random((40, 50)) < 0.3
    for radius in (1, 2, 5):
        np.testing.assert_array_equal(jandf.disk_dilation(mask, radius),
                                      skimage_dilation(mask, radius))


# ------------------------------------------------------------------ propagation


def dino_propagation(target, contexts, labels, near, topk=5, temperature=0.1):
    """DINO's `label_propagation` in NumPy (context frames stacked, top-k over all)."""
    features = np.stack(contexts)  # [n, P, D]
    affinity = np.exp(np.einsum('qd,nkd->nqk', target, features) / temperature)
    affinity = affinity * near[None]
    affinity = affinity.transpose(0, 2, 1).reshape(-1, target.shape[0])  # [n·P, q]
    threshold = np.sort(affinity, axis=0)[-topk]
    affinity[affinity < threshold] = 0
    affinity = affinity / affinity.sum(0, keepdims=True)
    return np.concatenate(labels).T @ affinity  # [C, q]


def test_scan_equals_dino_loop_with_its_queue():
    rng = np.random.default_rng(0)
    grid, dim, channels, n_last, frames = (5, 6), 8, 3, 2, 7
    patches = grid[0] * grid[1]
    features = rng.normal(size=(frames, patches, dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    first = np.eye(channels, dtype=np.float32)[rng.integers(0, channels, patches)]
    near = davis.neighbourhood(grid, 2)
    expected, queue = [], []
    for t in range(1, frames):
        soft = dino_propagation(features[t], [features[0]] + [f for f, _ in queue],
                                [first] + [s for _, s in queue], near).T
        queue = (queue + [(features[t], soft)])[-n_last:]
        expected.append(davis.label_map(jnp.asarray(soft), grid, 4))
    valid = np.arange(frames) > 0
    _, masks = davis._propagate(davis.empty_queue(n_last, patches, dim, channels),
                                features[0], first, features, valid, grid=grid,
                                patch_size=4, radius=2, topk=5, temperature=0.1)
    np.testing.assert_array_equal(np.asarray(masks)[1:], np.stack(expected))


def test_palette_and_resizing_are_davis_and_dino_values():
    palette = davis.davis_palette()
    np.testing.assert_array_equal(palette[:5], [[0, 0, 0], [128, 0, 0], [0, 128, 0],
                                                [128, 128, 0], [0, 0, 128]])
    assert palette[255].tolist() == [224, 224, 192]
    assert davis.resized_shape(480, 854, 480, 64) == (480, 832)
    assert davis.resized_shape(854, 480, 480, 64) == (832, 480)


PATCH = 2


def texture_features(frames, size):
    """Each 2×2 patch's pixels, flattened: features that see the texture."""
    frames = frames.astype(jnp.float32)
    if frames.shape[1:3] != size:
        frames = jax.image.resize(frames, (frames.shape[0], *size, 3), 'linear')
    batch, height, width, _ = frames.shape
    patches = (frames / 255 - 0.5).reshape(batch, height // PATCH, PATCH, width // PATCH,
                                           PATCH, 3)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, 3 * PATCH ** 2)
    return patches / jnp.linalg.norm(patches, axis=-1, keepdims=True)


def test_texture_features_recover_the_masks(davis_root, tfds_davis_dir, tmp_path):
    folder = davis.DavisFolder(davis_root, '480p', 'val')
    videos = davis.select_videos(folder, '')
    tfds_videos = davis.select_videos(davis.DavisTfds('davis/480p', tfds_davis_dir, 'val'), '')
    assert [v.name for v in videos] == [v.name for v in tfds_videos] == sorted(
        user_data.DAVIS_SEQUENCES)
    for video, same in zip(videos, tfds_videos):  # TFDS's layout holds the same videos
        assert video.frame_names == same.frame_names
        for index in (0, len(video) - 1):
            np.testing.assert_array_equal(video.read_frame(index), same.read_frame(index))
            np.testing.assert_array_equal(video.read_mask(index), same.read_mask(index))
    settings = davis.Settings(
        n_last_frames=(1,), short_side=72, long_side_multiple=PATCH,
        size_mask_neighborhood=12, topk=5, temperature=0.1, batch_size=4,
        overlay_sequences=1, patch_size=PATCH)
    results = davis.evaluate_videos(videos, jax.jit(texture_features, static_argnums=1),
                                    settings, mesh=data_mesh(1), out_dir=tmp_path)
    run, = results['runs']
    assert run['global']['J&F-Mean'] > 0.9, davis.table(results)
    assert all(o['J']['mean'] > 0.8 for s in run['sequences'].values() for o in s['objects'])
    for name in user_data.DAVIS_SEQUENCES:
        written = sorted((tmp_path / '1' / name).iterdir())
        assert [p.name for p in written] == [f'{t:05d}.png' for t in
                                             range(user_data.DAVIS_FRAMES)]
        with Image.open(written[3]) as image:
            assert image.mode == 'P' and image.size == user_data.DAVIS_SIZE[::-1]
            assert image.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
        with Image.open(written[0]) as image:  # the first frame: its annotation
            np.testing.assert_array_equal(np.asarray(image), videos[0].read_mask(0)
                                          if name == videos[0].name else
                                          videos[1].read_mask(0))
    first = videos[0].name
    assert sorted(p.name for p in (tmp_path / 'overlays' / '1').iterdir()) == [
        f'{first}.gif', f'{first}.png']


# ------------------------------------------------------------------ the command

TINY_VIT = (f'--run_config={TINY}', '--run_config.model.embed_dim=32',
            '--run_config.model.depth=1', '--run_config.model.num_heads=2',
            '--run_config.model.patch_size=8')
TINY_RESNET = (f'--run_config={REPO}/configs/resnet50_imagenet.py',
               '--run_config.model.width=8', '--run_config.model.stage_depths=(1, 1, 1, 1)',
               '--run_config.crops.global_size=32', '--run_config.crops.local_size=16')


def evaluate_davis(*flags, devices=1, model=TINY_VIT):
    return subprocess.run(
        [sys.executable, '-m', 'bam_jax.evaluate', '--features=random', *model,
         '--config.protocols=davis',
         '--config.davis.short_side=64', '--config.davis.batch_size=4', *map(str, flags)],
        env=environment(devices), cwd=REPO, capture_output=True, text=True, timeout=600,
        check=False)


def test_command_on_1_and_4_devices_gives_the_same_masks(davis_root, tmp_path):
    outs = {devices: tmp_path / f'{devices}dev.json' for devices in (1, 4)}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip(outs, pool.map(
            lambda devices: evaluate_davis(f'--config.davis.root={davis_root}',
                                           '--config.davis.sequences=marbles',
                                           '--config.davis.n_last_frames=(1, 7)',
                                           f'--out={outs[devices]}', devices=devices),
            outs)))
    summaries = {}
    for devices, result in results.items():
        assert result.returncode == 0, result.stderr[-3000:]
        assert 'J&F-Mean n=7' in result.stdout and 'J&F-Mean n=1' in result.stdout
        summaries[devices] = json.loads(outs[devices].read_text())
    runs = summaries[4]['results']['davis']['runs']
    assert [run['n_last_frames'] for run in runs] == [1, 7]
    assert list(runs[0]['sequences']) == ['marbles']
    assert len(runs[0]['sequences']['marbles']['objects']) == 3
    assert 0 <= runs[1]['global']['J&F-Mean'] <= 1
    pngs = sorted(p.relative_to(tmp_path / '1dev.davis')
                  for p in (tmp_path / '1dev.davis').rglob('*.png'))
    assert len(pngs) == 2 * (user_data.DAVIS_FRAMES + 1)  # per n: the masks, the strip
    for path in pngs:
        with Image.open(tmp_path / '1dev.davis' / path) as one, Image.open(
                tmp_path / '4dev.davis' / path) as four:
            np.testing.assert_array_equal(np.asarray(one), np.asarray(four), err_msg=path)
    assert runs == summaries[1]['results']['davis']['runs']


def not_indexed(root):
    path = pathlib.Path(root) / 'Annotations' / '480p' / 'blocks' / '00003.png'
    with Image.open(path) as image:
        image.convert('L').save(path)


BAD_INPUTS = {  # case: (its message, in the one error line)
    'missing sequence': "sequences ['no-such-sequence'] are not in the split",
    'not indexed': "00003.png is a 'L' PNG; DAVIS annotations are indexed ('P') PNGs",
    'resnet': "label propagation needs a ViT's patch tokens; ResNet has none",
    # No root: TFDS's davis/480p, here not prepared (TFDS's own warnings held back).
    'unprepared tfds': "TFDS data set davis/480p in data_dir='{}' is not prepared; set "
                       'config.davis.root',
}


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input_is_one_error_line(case, davis_root, tmp_path):
    root, flags, model = davis_root, (), TINY_VIT
    message = BAD_INPUTS[case]
    if case == 'unprepared tfds':
        root, flags = None, (f'--config.davis.tfds_data_dir={tmp_path}',)
        message = message.format(tmp_path)
    elif case == 'not indexed':
        root = tmp_path / 'DAVIS'
        shutil.copytree(davis_root, root)
        not_indexed(root)
    elif case == 'missing sequence':
        flags = ('--config.davis.sequences=blocks,no-such-sequence',)
    elif case == 'resnet':
        model = TINY_RESNET
    out = tmp_path / 'out' / 'eval.json'
    out.parent.mkdir()
    root = () if root is None else (f'--config.davis.root={root}',)
    result = evaluate_davis(*root, *flags, f'--out={out}', model=model)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith('error: ') and message in lines[0], lines[0]
    assert list(out.parent.iterdir()) == []  # nothing written


def test_missing_root_and_unprepared_tfds_are_data_errors(tmp_path):
    settings = ml_collections.ConfigDict(dict(
        root=str(tmp_path / 'nowhere'), resolution='480p', tfds_name='davis/480p',
        tfds_data_dir=str(tmp_path), split='val'))
    with pytest.raises(DataError, match='DAVIS root .*nowhere does not exist'):
        davis.make_source(settings)
    settings.root = None
    with pytest.raises(DataError, match='davis/480p .* is not prepared; set '
                                        'config.davis.root'):
        davis.make_source(settings)


@pytest.mark.parametrize('change, message', [
    (dict(n_last_frames=(0,)), r'n_last_frames=\(0,\): n_last_frames must be ≥ 1'),
    (dict(batch_size=3), 'config.davis.batch_size=3: .* a multiple of the 8 devices'),
    (dict(short_side=60), 'config.davis.short_side=60: .* the patch size 8'),
    (dict(sequences='blocks', root=None), r'davis/480p .* is not prepared'),
])
def test_settings_are_checked_before_any_work(change, message, davis_root, tmp_path):
    config = evaluate_config.get_config()
    config.davis.update(dict(root=davis_root, tfds_data_dir=str(tmp_path)))
    config.davis.update(change)
    subject = runner.Subject('random', vit('tiny', patch_size=8), None, {})
    evaluation = runner.Evaluation(config, mnist.get_config(), subject, protocols=['davis'])
    with pytest.raises((runner.EvaluationError, DataError), match=message):
        evaluation.check(['davis'])
