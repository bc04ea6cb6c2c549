"""kNN evaluation: the sharded classifier against a NumPy transcription of the official
`knn_classifier`, the eval input on the embedded MNIST, feature extraction, subsets."""

import functools
import importlib.util
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from bam_jax.data import augment, eval_input, sources
from bam_jax.evaluate import extract_features, knn_accuracy, knn_classify, topk_accuracy
from conftest import data_mesh

flags.FLAGS.mark_as_parsed()  # grain reads absl flags.


def official_knn(train_features, train_labels, test_features, test_labels, k, temperature,
                 num_classes, chunk=7):
    """DINO's `knn_classifier` / BAM's `distributed_knn` voting in float64 NumPy.

    Chunked similarity, top-k, `exp(sim / T)` weights on a one-hot vote, classes sorted by
    summed vote. Ties (torch leaves them unspecified) go to the lower bank row and the
    lower class, the rule `knn_classify` documents. Returns the ranked classes and votes
    (the first min(5, k) columns) and the top-1 / top-5 accuracy in percent.
    """
    def normalize(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    train_features = normalize(train_features).T
    test_features = normalize(test_features)
    n_predictions = min(5, k, num_classes)
    classes, votes, top1, top5 = [], [], 0, 0
    for start in range(0, len(test_features), chunk):
        features = test_features[start:start + chunk]
        targets = test_labels[start:start + chunk]
        batch_size = len(targets)
        similarity = features @ train_features
        indices = np.argsort(-similarity, axis=1, kind='stable')[:, :k]
        distances = np.take_along_axis(similarity, indices, axis=1)
        retrieved = train_labels[indices]
        one_hot = np.zeros((batch_size * k, num_classes))
        one_hot[np.arange(batch_size * k), retrieved.reshape(-1)] = 1
        probs = np.sum(one_hot.reshape(batch_size, k, num_classes)
                       * np.exp(distances / temperature)[..., None], axis=1)
        predictions = np.argsort(-probs, axis=1, kind='stable')
        correct = predictions == targets[:, None]
        top1 += correct[:, :1].sum()
        top5 += correct[:, :min(5, k)].sum()
        classes.append(predictions[:, :n_predictions])
        votes.append(np.take_along_axis(probs, predictions[:, :n_predictions], axis=1))
    total = len(test_labels)
    return (np.concatenate(classes), np.concatenate(votes),
            {'top1': 100.0 * top1 / total, 'top5': 100.0 * top5 / total})


def _random_split(rng, n, dim, num_classes):
    return (rng.normal(size=(n, dim)).astype(np.float32),
            rng.integers(0, num_classes, n).astype(np.int32))


@pytest.mark.parametrize('n_devices', [None, 1, 2, 4, 8])
def test_equals_official_on_random_features(n_devices):
    rng = np.random.default_rng(0)
    num_classes = 7
    # 203 bank rows: not divisible by 2, 4 or 8; small chunks and blocks, so queries go
    # in several chunks and each device's bank in several blocks, the last one overlapping.
    train, train_labels = _random_split(rng, 203, 16, num_classes)
    test, test_labels = _random_split(rng, 61, 16, num_classes)
    # Invalid rows equal to test queries (similarity 1) would be everyone's neighbours.
    padding = np.concatenate([test[:5] * 3.0, np.zeros((4, 16), np.float32)])
    bank = np.concatenate([train[:100], padding, train[100:]])
    bank_labels = np.concatenate([train_labels[:100], np.zeros(9, np.int32),
                                  train_labels[100:]])
    valid = np.ones(len(bank), bool)
    valid[100:109] = False
    mesh = None if n_devices is None else data_mesh(n_devices)

    result = knn_classify(bank, bank_labels, test, train_valid=valid, num_classes=num_classes,
                          mesh=mesh, query_chunk_size=16, bank_block_size=10)
    classes, votes, accuracy = official_knn(train, train_labels, test, test_labels, k=20,
                                            temperature=0.07, num_classes=num_classes)
    assert result.classes.shape == (61, 5) and result.classes.dtype == jnp.int32
    np.testing.assert_array_equal(result.classes, classes)
    np.testing.assert_allclose(result.scores, votes, rtol=1e-4)
    assert topk_accuracy(result.classes, test_labels) == pytest.approx(accuracy, abs=1e-9)
    assert 0 < accuracy['top1'] < accuracy['top5'] < 100  # random: a test that can fail


@pytest.mark.parametrize('n_devices', [1, 4, 8])
def test_ties_go_to_the_earlier_bank_row_on_any_mesh(n_devices):
    """30 bank rows all at similarity 1 (exactly, basis vectors): the first 20 vote."""
    dim = 4
    bank = np.zeros((37, dim), np.float32)
    bank[:30, 0] = 1.0  # ties with the query
    bank[30:, 1] = 1.0  # orthogonal
    bank_labels = np.asarray([2] * 12 + [0] * 8 + [1] * 10 + [3] * 7, np.int32)
    queries = np.eye(dim, dtype=np.float32)[[0, 0, 1]]
    result = knn_classify(bank, bank_labels, queries, num_classes=5, k=20,
                          mesh=data_mesh(n_devices), query_chunk_size=8, bank_block_size=3)
    classes, votes, _ = official_knn(bank, bank_labels, queries, np.zeros(3, np.int32),
                                     k=20, temperature=0.07, num_classes=5)
    np.testing.assert_array_equal(result.classes, classes)
    np.testing.assert_allclose(result.scores, votes, rtol=1e-5)
    # Label 2 has 12 of the 20 first rows, label 0 the other 8; label 1 none; then the
    # zero-vote classes by index. The orthogonal query: 7 label-3 rows + 13 of the ties.
    np.testing.assert_array_equal(result.classes[0], [2, 0, 1, 3, 4])
    np.testing.assert_allclose(result.scores[0, :2], np.asarray([12, 8]) * np.exp(1 / 0.07),
                               rtol=1e-5)
    np.testing.assert_array_equal(result.classes[2], [3, 2, 0, 1, 4])  # 12 of label 2, 1 of 0
    np.testing.assert_allclose(result.scores[2, :3], [7 * np.exp(1 / 0.07), 12, 1], rtol=1e-5)


def test_planted_clusters_are_classified_perfectly():
    rng = np.random.default_rng(1)
    num_classes, dim = 10, 32
    centres = rng.normal(size=(num_classes, dim))
    train_labels = np.repeat(np.arange(num_classes), 50).astype(np.int32)
    test_labels = np.repeat(np.arange(num_classes), 20).astype(np.int32)
    train = centres[train_labels] + 0.1 * rng.normal(size=(len(train_labels), dim))
    test = centres[test_labels] + 0.1 * rng.normal(size=(len(test_labels), dim))
    result = knn_classify(train.astype(np.float32), train_labels, test.astype(np.float32),
                          num_classes=num_classes, mesh=data_mesh(4))
    assert topk_accuracy(result.classes, test_labels) == {'top1': 100.0, 'top5': 100.0}
    # The same bank with shuffled labels is at chance.
    result = knn_classify(train.astype(np.float32), rng.permutation(train_labels),
                          test.astype(np.float32), num_classes=num_classes, mesh=data_mesh(4))
    assert topk_accuracy(result.classes, test_labels)['top1'] < 30


def test_imagenet_size_bank_compiles_to_bounded_memory():
    """1.28M × 384 bank, 50k queries, 8 devices: the per-device scratch is a few
    similarity tiles, and less than one copy of the device's bank shard."""
    mesh = data_mesh(8)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    shapes = [jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for shape, dtype in (
        ((1_281_168, 384), jnp.float32), ((1_281_168,), jnp.int32), ((1_281_168,), bool),
        ((50_000, 384), jnp.float32))]
    from bam_jax.evaluate.knn import _knn_classify
    compiled = _knn_classify.trace(
        *shapes, k=20, num_classes=1000, temperature=0.07, mesh=mesh, axis_name='data',
        query_chunk_size=1024, bank_block_size=16384,
        precision=jax.lax.Precision.HIGHEST).lower().compile()
    memory = compiled.memory_analysis()
    bank_bytes_per_device = 1_281_168 * 384 * 4 / 8
    tile_bytes = 1024 * 16384 * 4  # one (query chunk × bank block) similarity tile
    assert memory.temp_size_in_bytes < min(4 * tile_bytes, bank_bytes_per_device)


# ---------------------------------------------------------------------------
# The eval input
# ---------------------------------------------------------------------------
@functools.cache
def _mnist(split):
    """The embedded MNIST split's source (`.images`, `.labels`), loaded once per split."""
    return sources.make_source(ml_collections.ConfigDict(dict(source='mnist', split=split)))


def test_eval_input_covers_mnist_once_over_two_processes():
    source = _mnist('test')
    images, labels = source.images, source.labels
    seen = []
    for process_index in range(2):
        data = eval_input.make_eval_input(source, image_size=28, resize_size=28, batch_size=64,
                                          process_index=process_index, process_count=2)
        batches = list(data)
        assert data.num_batches == len(batches) == 8  # 500 per process in 8 batches of 64
        assert data.num_examples == 1000
        for batch in batches:
            assert batch['image'].shape == (64, 28, 28, 3) and batch['image'].dtype == np.uint8
            assert batch['label'].dtype == np.int32 and batch['valid'].dtype == bool
            index, valid = batch['index'], batch['valid']
            np.testing.assert_array_equal(valid, index >= 0)
            np.testing.assert_array_equal(batch['label'][valid], labels[index[valid]])
            np.testing.assert_array_equal(batch['label'][~valid], -1)
            # 28 px with resize 28: the digit itself, in all three channels.
            np.testing.assert_array_equal(batch['image'][valid],
                                          np.repeat(images[index[valid]][..., None], 3, -1))
            assert not batch['image'][~valid].any()
            seen.append(index[valid])
        assert batches[-1]['valid'].sum() == 500 - 7 * 64
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(seen, np.arange(1000))  # each once, in order

    subset = eval_input.make_eval_input(source, image_size=32, batch_size=8,
                                        indices=np.asarray([5, 3, 999]))
    (batch,) = list(subset)
    assert batch['image'].shape == (8, 32, 32, 3)  # 28 → 36 (32 / 0.875) → 32
    np.testing.assert_array_equal(batch['index'], [5, 3, 999] + [-1] * 5)


def test_resize_and_centre_crop_match_torchvision(tmp_path):
    """Our PIL resize/crop against torchvision's `Resize(256, bicubic)`, `CenterCrop(224)`."""
    if importlib.util.find_spec('torchvision') is None:
        pytest.skip('torchvision is not installed')
    rng = np.random.default_rng(0)
    sizes = [(300, 500), (500, 301), (256, 256), (224, 230), (37, 29)]
    ours = []
    for i, (height, width) in enumerate(sizes):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f'{i}.png')
        ours.append(eval_input.resize_center_crop(Image.fromarray(image), 256, 224))
    # torch in a process that never imports TensorFlow.
    script = f"""
import numpy as np, sys
from PIL import Image
from torchvision import transforms
transform = transforms.Compose([transforms.Resize(256, interpolation=3),
                                transforms.CenterCrop(224)])
np.save(sys.argv[1], np.stack([np.asarray(transform(Image.open(f'{tmp_path}/{{i}}.png')))
                               for i in range({len(sizes)})]))
"""
    subprocess.run([sys.executable, '-c', script, str(tmp_path / 'torch.npy')], check=True)
    np.testing.assert_array_equal(np.stack(ours), np.load(tmp_path / 'torch.npy'))


def test_eval_input_rejects_bad_arguments():
    source = _mnist('test')
    with pytest.raises(ValueError, match='resize_size 20 is smaller than the crop'):
        eval_input.make_eval_input(source, image_size=28, resize_size=20, batch_size=8)
    with pytest.raises(sources.DataError, match=r'indices must lie in \[0, 1000\)'):
        eval_input.make_eval_input(source, image_size=28, batch_size=8, indices=[1000])


def test_balanced_subset_is_the_official_sample():
    labels = np.repeat(np.arange(10), 400)[np.random.default_rng(0).permutation(4000)]
    subset = eval_input.balanced_subset(labels, 0.1, seed=0)
    assert len(subset) == len(np.unique(subset)) == 400
    np.testing.assert_array_equal(np.bincount(labels[subset]), [40] * 10)
    np.testing.assert_array_equal(subset, eval_input.balanced_subset(labels, 0.1, seed=0))
    assert not np.array_equal(np.sort(subset),
                              np.sort(eval_input.balanced_subset(labels, 0.1, seed=1)))
    # The official `get_subset_indices` on one process: global legacy seed, choice, shuffle.
    np.random.seed(0)
    official = np.hstack([np.random.choice(np.where(labels == c)[0], 40, replace=False)
                          for c in np.unique(labels)])
    np.random.shuffle(official)
    np.testing.assert_array_equal(subset, official)
    # floor(floor(4000 · 0.0333) / 10) = 13 per class.
    assert len(eval_input.balanced_subset(labels, 0.0333)) == 130
    np.testing.assert_array_equal(eval_input.balanced_subset(labels, 1), np.arange(4000))
    with pytest.raises(ValueError, match='fraction must be in'):
        eval_input.balanced_subset(labels, 1.5)
    with pytest.raises(sources.DataError, match='Class 3 has 5 examples'):
        eval_input.balanced_subset(np.concatenate([labels[labels != 3], [3] * 5]), 0.5)


# ---------------------------------------------------------------------------
# Features of whole splits, and the protocol end to end
# ---------------------------------------------------------------------------
@jax.jit
def raw_pixels(images):
    return images.reshape(images.shape[0], -1)


def test_knn_accuracy_of_raw_mnist_pixels_equals_official():
    """Eval input → device normalisation → features → sharded kNN, against NumPy."""
    train_source, test_source = _mnist('train'), _mnist('test')
    train_images, train_labels = train_source.images, train_source.labels
    test_images, test_labels = test_source.images, test_source.labels
    subset = eval_input.balanced_subset(eval_input.source_labels(train_source), 0.25)
    inputs = [eval_input.make_eval_input(source, image_size=28, resize_size=28,
                                         batch_size=48, indices=indices)
              for source, indices in ((train_source, subset), (test_source, None))]
    mesh = data_mesh(4)

    test_features = extract_features(raw_pixels, inputs[1], mesh=mesh)
    assert test_features.features.shape == (21 * 48, 28 * 28 * 3)  # 1000 in 21 batches
    assert test_features.features.sharding.spec == jax.sharding.PartitionSpec('data')
    assert int(test_features.valid.sum()) == 1000
    np.testing.assert_array_equal(np.sort(np.asarray(test_features.labels)[
        np.asarray(test_features.valid)]), np.sort(test_labels))

    def normalized(images):
        rgb = np.repeat(images[..., None], 3, -1) / 255.0
        return ((rgb - augment.IMAGENET_MEAN) / augment.IMAGENET_STD).reshape(len(images), -1)

    _, _, official = official_knn(normalized(train_images[subset]), train_labels[subset],
                                  normalized(test_images), test_labels, k=20,
                                  temperature=0.07, num_classes=10, chunk=100)
    accuracy = knn_accuracy(raw_pixels, *inputs, mesh=mesh, num_classes=10)
    assert accuracy == pytest.approx(official, abs=1e-9)
    assert 85 < accuracy['top1'] < accuracy['top5'] <= 100
    print(f'raw MNIST pixels, 1000-image train subset: {accuracy}')

    tiny = eval_input.make_eval_input(test_source, image_size=28, resize_size=28,
                                      batch_size=8, indices=np.arange(900, 908))  # 9s
    with pytest.raises(ValueError, match='label 9, but num_classes is 5'):
        knn_accuracy(raw_pixels, tiny, tiny, mesh=mesh, num_classes=5)


_WORKER = """
import json, os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
jax.distributed.initialize(f'127.0.0.1:{sys.argv[2]}', 2, int(sys.argv[1]))
from absl import flags
import ml_collections
from jax.sharding import AxisType
from bam_jax.data import eval_input, sources
from bam_jax.evaluate import knn_accuracy
flags.FLAGS.mark_as_parsed()
mesh = jax.make_mesh((4,), ('data',), axis_types=(AxisType.Auto,))
inputs = []
for split, fraction in (('train', 0.1), ('test', 1)):
    source = sources.make_source(ml_collections.ConfigDict(dict(source='mnist', split=split)))
    indices = eval_input.balanced_subset(eval_input.source_labels(source), fraction)
    inputs.append(eval_input.make_eval_input(
        source, image_size=28, resize_size=28, batch_size=24, indices=indices,
        process_index=jax.process_index(), process_count=jax.process_count()))
features_fn = jax.jit(lambda images: images.reshape(images.shape[0], -1))
print(json.dumps(knn_accuracy(features_fn, *inputs, mesh=mesh, num_classes=10)))
"""


def test_two_processes_give_the_one_process_accuracy(tmp_path):
    """Two JAX processes × 2 CPU devices, each feeding its own half of both splits."""
    import json
    import os
    import socket

    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    script = tmp_path / 'worker.py'
    script.write_text(_WORKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS='')
    workers = [subprocess.Popen([sys.executable, str(script), str(rank), str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for rank in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    accuracies = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]

    inputs = []
    for split, fraction in (('train', 0.1), ('test', 1)):
        source = _mnist(split)
        indices = eval_input.balanced_subset(eval_input.source_labels(source), fraction)
        inputs.append(eval_input.make_eval_input(source, image_size=28, resize_size=28,
                                                 batch_size=48, indices=indices))
    expected = knn_accuracy(raw_pixels, *inputs, mesh=data_mesh(4), num_classes=10)
    assert accuracies[0] == accuracies[1] == pytest.approx(expected, abs=1e-9)
    assert expected['top1'] > 75  # 400 training digits
