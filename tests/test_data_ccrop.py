"""ContrastiveCrop boxes from attention maps, and the official schedule."""

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bam_jax.data import ccrop, crops as crops_lib, pipeline, sources
from bam_jax.models import VisionTransformer
from bam_jax.models.caformer import CAFormer
from bam_jax.train.builder import ConfigError
from bam_jax.train.loop import train_and_evaluate
from configs import caformer_m36_imagenet, resnet50_imagenet, vit_small_imagenet

flags.FLAGS.mark_as_parsed()


def _torch_bilinear(grid, size):
    """Reference upsampling, torch's `interpolate(bilinear, align_corners=False)`."""
    def weights(n_in):
        source = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, None)
        low = np.minimum(np.floor(source).astype(int), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        matrix = np.zeros((size, n_in))
        matrix[np.arange(size), low] += 1 - (source - low)
        matrix[np.arange(size), high] += source - low
        return matrix
    rows, columns = weights(grid.shape[0]), weights(grid.shape[1])
    return rows @ grid @ columns.T


def _reference_box(summed: np.ndarray, size: int, threshold: float = 0.1) -> np.ndarray:
    """The official box of one head-summed map, in NumPy: min-max, upsample, threshold."""
    summed = summed - summed.min()
    upsampled = _torch_bilinear(summed / (summed.max() + 1e-5), size)
    rows = np.flatnonzero(upsampled.max(1) > threshold)
    columns = np.flatnonzero(upsampled.max(0) > threshold)
    return np.array([rows[0], columns[0], rows[-1], columns[-1]]) / size


def test_box_is_where_the_cls_attention_is():
    rng = np.random.default_rng(0)
    attention = rng.uniform(0, 0.02, (2, 3, 1 + 49, 1 + 49))  # 7×7 patches, 3 heads
    hot = np.zeros((7, 7))
    hot[1:3, 4:6] = 1.0
    attention[0, :, 0, 1:] += hot.ravel()
    attention[1, :, 0, 1:] += np.roll(hot, (3, -3), axis=(0, 1)).ravel()
    boxes = np.asarray(ccrop.boxes_from_attention(jnp.asarray(attention, jnp.float32),
                                                  image_size=70, threshold=0.1))
    for image in range(2):
        np.testing.assert_allclose(
            boxes[image],
            _reference_box(attention[image, :, 0, 1:].sum(0).reshape(7, 7), 70), atol=1e-6)
    # The hot patches are rows 1-2, columns 4-5 of 7: pixels 10-29 and 40-59 of 70,
    # widened by the bilinear upsampling.
    assert 0.08 < boxes[0, 0] < 0.15 and 0.55 < boxes[0, 3] < 0.95
    assert boxes[1, 0] > boxes[0, 2] - 0.05  # moved down by three patches


def test_model_boxes_from_a_vit_and_crops_inside_them():
    model = VisionTransformer(patch_size=4, img_size=16, embed_dim=16, depth=2, num_heads=2)
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    variables = model.init(jax.random.key(1), images)
    boxes = np.asarray(jax.jit(lambda v, x: ccrop.model_boxes(model, v, x))(variables, images))
    assert boxes.shape == (3, 4)
    assert np.all((0 <= boxes) & (boxes <= 1))
    assert np.all(boxes[:, 0] <= boxes[:, 2]) and np.all(boxes[:, 1] <= boxes[:, 3])

    config = vit_small_imagenet.get_config().crops
    config.update(dict(global_size=16, local_size=8, n_local=1))
    source = sources.SyntheticSource(4, 40, 40)
    boxes = ccrop.initial_boxes(4)
    boxes[:] = [0.0, 0.0, 0.3, 0.3]  # the top-left corner only
    batch = next(iter(pipeline.make_pipeline(source, config, batch_size=4, seed=0,
                                             boxes=boxes)))
    # Exactly what the crop function makes for those boxes, and not the unboxed crops.
    plain = next(iter(pipeline.make_pipeline(source, config, batch_size=4, seed=0)))
    assert not np.array_equal(batch['global'], plain['global'])
    rng = np.random.default_rng(0)
    centres = np.array([crops_lib.sample_crop_box(rng, 40, 40, (0.05, 0.25), box=boxes[0])
                        for _ in range(200)])
    assert np.all(centres[:, 0] + centres[:, 2] // 2 <= 0.3 * 40 + 1)


def test_model_boxes_from_a_caformer_attention_map():
    """CAFormer boxes come from its last attention block's query-averaged map [N, heads,
    h, w], summed over heads, then the ViT's normalise / upsample / threshold."""
    model = CAFormer(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    images = jax.random.normal(jax.random.key(0), (3, 96, 96, 3))
    # Random weights (N(0, 0.2) kernels, norms near 1) without compiling the init.
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(model.init, jax.random.key(1), images[:1])
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: ((path[-1].key == 'scale') + 0.2 * rng.normal(
            size=leaf.shape)).astype(np.float32), shapes)

    @jax.jit
    def boxes_and_maps(variables, images):
        maps = model.apply(variables, images, return_attention=True,
                           method=model.encode)['attention_map']
        return ccrop.model_boxes(model, variables, images), maps

    boxes, maps = (np.asarray(array) for array in boxes_and_maps(variables, images))
    assert boxes.shape == (3, 4)
    assert np.all((0 <= boxes) & (boxes <= 1))
    assert np.all(boxes[:, 0] <= boxes[:, 2]) and np.all(boxes[:, 1] <= boxes[:, 3])
    # The reference: the same map (3×3 over the last stage, 2 heads) through NumPy.
    assert maps.shape == (3, 2, 3, 3)
    for image in range(3):
        np.testing.assert_allclose(
            boxes[image], _reference_box(maps[image].astype(np.float64).sum(0), 96),
            atol=1e-6)
    assert not np.all(boxes == [0, 0, 95 / 96, 95 / 96])  # not all whole images


def test_training_refuses_contrastive_crop_without_attention(tmp_path):
    """A ResNet has no attention map to crop by: the run stops before reading data."""
    config = resnet50_imagenet.get_config()
    config.data.ccrop = True
    with pytest.raises(ConfigError, match=r"config.data.ccrop=True needs attention maps, "
                                          r"which the 'resnet50' backbone has none of; "
                                          r"set config.data.ccrop=False"):
        train_and_evaluate(config, str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    config = caformer_m36_imagenet.get_config()
    assert config.data.ccrop  # the official CAFormer run crops by attention


def test_official_schedule():
    # Scripts: warm-up 40, interval 40, 400 epochs: updates after 40, 80, ..., 360.
    updates = [epoch for epoch in range(400) if ccrop.update_boxes_after(epoch, 400, 40, 40)]
    assert updates == list(range(40, 400, 40))
    assert not ccrop.use_boxes_in(40, 40, 40) and ccrop.use_boxes_in(41, 40, 40)
