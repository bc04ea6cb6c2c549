"""Low-label evaluation: few-shot episodes, Recall@K, k-means NMI/ARI, attention maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn import linear_model, metrics

from bam_jax.evaluate import attention, clustering, fewshot, retrieval
from bam_jax.models import ResNet, VisionTransformer
from bam_jax.models.caformer import CAFormer


def _clusters(n_classes, per_class, dim, spread, seed=0):
    """Rows around `n_classes` random unit centres, `per_class` each, labels shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    return features.astype(np.float32), labels


# ------------------------------------------------------------------------- few-shot


def test_episodes_are_seeded_disjoint_and_within_one_class_per_way():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), [30, 25, 20, 20, 40, 19, 3, 22])  # 5 and 6 too small
    labels = labels[rng.permutation(len(labels))]
    support, query = fewshot.sample_episodes(labels, n_way=4, n_shot=5, n_query=15,
                                             n_episodes=50, seed=3)
    assert support.shape == (50, 4, 5) and query.shape == (50, 4, 15)
    again = fewshot.sample_episodes(labels, n_way=4, n_shot=5, n_query=15, n_episodes=50,
                                    seed=3)
    np.testing.assert_array_equal(support, again[0])
    np.testing.assert_array_equal(query, again[1])
    other = fewshot.sample_episodes(labels, n_way=4, n_shot=5, n_query=15, n_episodes=50,
                                    seed=4)
    assert not np.array_equal(support, other[0])

    rows = np.concatenate([support, query], axis=2)  # [E, way, 20]
    classes = labels[rows]
    assert np.all(classes == classes[..., :1])  # one class per way
    way_classes = classes[..., 0]
    assert all(len(set(episode)) == 4 for episode in way_classes)  # distinct ways
    assert not np.isin(way_classes, [5, 6]).any()  # fewer than 20 examples: skipped
    assert set(np.unique(way_classes)) == {0, 1, 2, 3, 4, 7}
    for episode in rows:  # support and query rows all distinct
        assert len(np.unique(episode)) == episode.size

    with pytest.raises(ValueError, match='need 7 classes of at least 20 examples; the '
                                         'labels have 6 such classes'):
        fewshot.sample_episodes(labels, n_way=7, n_shot=5, n_query=15)
    with pytest.raises(ValueError, match=r'labels \[N\]; got features \(3, 4\) and labels'):
        fewshot.few_shot(np.zeros((3, 4)), labels[:2])
    with pytest.raises(ValueError, match="Unknown classifier 'svm'"):
        fewshot.few_shot(np.zeros((3, 4)), labels[:3], classifier='svm')


@pytest.mark.parametrize('classifier', fewshot.CLASSIFIERS)
def test_few_shot_on_separable_clusters_is_perfect(classifier):
    features, labels = _clusters(12, 25, 32, spread=0.2)
    result = fewshot.few_shot(features, labels, n_episodes=100, classifier=classifier)
    assert result == {'accuracy': 100.0, 'ci95': 0.0}


def test_few_shot_on_random_features_is_chance():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6000, 64)).astype(np.float32)
    labels = np.repeat(np.arange(20), 300)
    # A binomial spread of 75 queries at p = 1/5 gives the expected half-width.
    expected_ci = 100 * 1.96 * np.sqrt(0.2 * 0.8 / 75) / np.sqrt(600)
    for classifier in fewshot.CLASSIFIERS:
        result = fewshot.few_shot(jnp.asarray(features), labels, classifier=classifier)
        assert 0.8 * expected_ci < result['ci95'] < 1.2 * expected_ci
        # Within two half-widths, not one: all episodes share one finite data set, whose
        # own chance departure (here -1.4 half-widths) the episode spread cannot show.
        assert abs(result['accuracy'] - 20.0) < 2 * result['ci95'], result


def test_logistic_regression_matches_scikit_learn():
    rng = np.random.default_rng(1)
    features, labels = _clusters(5, 5, 48, spread=3.0, seed=1)  # overlapping classes
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    # scikit-learn fits float32 input in float32: give it float64 for a reference.
    queries = rng.normal(size=(40, 48))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    reference = linear_model.LogisticRegression(C=fewshot.LOGISTIC_C, tol=1e-12,
                                                max_iter=100_000)
    reference.fit(features.astype(np.float64), labels)
    with jax.default_matmul_precision('highest'):
        weights, bias = fewshot.fit_logistic(jnp.asarray(features), jnp.asarray(labels), 5)
        probabilities = jax.nn.softmax(jnp.asarray(queries, jnp.float32) @ weights + bias)
    np.testing.assert_allclose(probabilities, reference.predict_proba(queries), atol=2e-6)
    assert 0.05 < np.abs(reference.coef_).max()  # a real fit, not a near-zero one


def test_prototype_and_logistic_agree_on_easy_data():
    features, labels = _clusters(10, 40, 32, spread=1.2, seed=2)
    results = {classifier: fewshot.few_shot(features, labels, n_episodes=200,
                                            classifier=classifier, seed=1)
               for classifier in fewshot.CLASSIFIERS}
    prototype, logistic = results['prototype'], results['logistic']
    assert 90 < prototype['accuracy'] < 100 and 90 < logistic['accuracy'] < 100, results
    assert abs(prototype['accuracy'] - logistic['accuracy']) < prototype['ci95'], results


# ------------------------------------------------------------------------ retrieval


def _reference_recall(features, labels, ks):
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarities = x @ x.T
    np.fill_diagonal(similarities, -np.inf)
    order = np.argsort(-similarities, axis=1, kind='stable')
    same = labels[order] == labels[:, None]
    return {f'recall@{k}': 100.0 * int(np.sum(same[:, :k].any(axis=1))) / len(labels)
            for k in ks}


def test_recall_at_k_counts_equal_a_brute_force_reference(monkeypatch):
    monkeypatch.setattr(retrieval, 'QUERY_BLOCK', 64)  # 300 = 4 blocks + a padded one
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 16))
    labels = rng.integers(0, 12, 300)
    ks = (1, 2, 4, 8, 16)
    recall = retrieval.recall_at_k(features.astype(np.float32), labels, ks)
    assert recall == _reference_recall(features, labels, ks)
    values = [recall[f'recall@{k}'] for k in ks]
    assert values == sorted(values) and values[0] < values[-1]
    # An item itself never counts: unique labels find nothing.
    assert retrieval.recall_at_k(features, np.arange(300), (1, 8)) == {
        'recall@1': 0.0, 'recall@8': 0.0}
    with pytest.raises(ValueError, match=r'Each K must be in \[1, 299\]'):
        retrieval.recall_at_k(features, labels, (1, 300))


# ----------------------------------------------------------------------- clustering


@pytest.mark.parametrize('n, n_true, n_pred', [(200, 5, 7), (1000, 10, 10), (60, 2, 30),
                                               (10, 1, 3), (12, 4, 1), (6, 1, 1),
                                               (30, 30, 30), (2, 2, 2)])
def test_nmi_and_ari_match_scikit_learn(n, n_true, n_pred):
    rng = np.random.default_rng(n * n_true + n_pred)
    labels_true = rng.integers(0, n_true, n) * 3 - 5  # any label values
    labels_pred = rng.integers(0, n_pred, n)
    for ours, theirs in ((clustering.normalized_mutual_info,
                          metrics.normalized_mutual_info_score),
                         (clustering.adjusted_rand_index, metrics.adjusted_rand_score)):
        assert abs(ours(labels_true, labels_pred) - theirs(labels_true, labels_pred)) < 1e-6
        relabelled = rng.permutation(n_pred + 3)[labels_pred]  # a perfect match: 1
        assert abs(ours(labels_pred, relabelled) - theirs(labels_pred, relabelled)) < 1e-6


def test_kmeans_recovers_separated_blobs():
    features, labels = _clusters(10, 60, 24, spread=0.3, seed=3)
    scores = clustering.kmeans_scores(features, labels)
    assert scores['nmi'] > 99 and scores['ari'] > 99, scores
    # Random features have no clusters to find.
    rng = np.random.default_rng(3)
    scores = clustering.kmeans_scores(rng.normal(size=features.shape), labels, n_init=2)
    assert scores['nmi'] < 10 and abs(scores['ari']) < 5, scores


# ----------------------------------------------------------------------- attention


def _random_variables(model, image_size):
    """N(0, 0.2) weights, norm scales near 1, without compiling the (slow) init."""
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(model.init, jax.random.key(1),
                            jnp.zeros((1, image_size, image_size, 3)))
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: ((path[-1].key == 'scale') + 0.2 * rng.normal(
            size=leaf.shape)).astype(np.float32), shapes)


def _vit():
    model = VisionTransformer(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=8)
    return model, _random_variables(model, 16)


def test_vit_maps_are_the_cls_attention_to_the_patches():
    model, variables = _vit()
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    maps = jax.jit(lambda v, x: attention.attention_maps(model, v, x))(variables, images)
    assert maps.shape == (3, 8, 4, 4)
    probabilities = jax.jit(lambda v, x: model.apply(
        v, x, return_attention=True, method=model.encode))(variables, images)['attention']
    assert probabilities.shape == (3, 8, 17, 17)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1 - probabilities[:, :, 0, 0],
                               atol=1e-6)
    np.testing.assert_allclose(maps[1, 5, 2, 3], probabilities[1, 5, 0, 1 + 2 * 4 + 3],
                               rtol=1e-6)


def test_caformer_maps_are_its_attention_map():
    model = CAFormer(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), head_dim=16)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = _random_variables(model, 64)

    @jax.jit
    def maps_and_encoded(variables, images):
        return (attention.attention_maps(model, variables, images),
                model.apply(variables, images, return_attention=True, method=model.encode))

    maps, encoded = maps_and_encoded(variables, images)
    assert maps.shape == (2, 4, 2, 2)  # 64 / 16 heads over the 64 / 32 = 2 grid
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-6)
    np.testing.assert_allclose(maps, encoded['attention_map'], rtol=1e-6)


def test_saved_pngs_show_the_image_and_every_head(tmp_path):
    model, variables = _vit()
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), np.uint8)
    out_dir = tmp_path / 'maps'
    paths = attention.save_attention_maps(model, variables, images, out_dir, image_size=16)
    assert paths == [out_dir / f'attention_{i:05d}.png' for i in range(3)]
    assert sorted(tmp_path.iterdir()) == [out_dir]  # no staging directory left
    for image, path in zip(images, paths):
        picture = np.asarray(Image.open(path))
        # 1 image + 8 heads + the mean = 10 panels of 16 px: 8 in a row, then 2.
        assert picture.shape == (32, 128, 3)
        np.testing.assert_array_equal(picture[:16, :16], image)
        assert np.all(picture[16:, 32:] == 255)  # the row ends after the mean
        assert len(np.unique(picture[:16, 16:32].reshape(-1, 3), axis=0)) > 4  # a map


def test_resnet_is_refused_before_any_output(tmp_path):
    model = ResNet()
    with pytest.raises(ValueError, match='ResNet has no self-attention'):
        attention.attention_maps(model, {}, jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match='ResNet has no self-attention'):
        attention.save_attention_maps(model, {}, np.zeros((1, 16, 16, 3), np.uint8),
                                      tmp_path / 'maps', image_size=16)
    assert not list(tmp_path.iterdir())
