"""The L-BFGS logistic-regression transfer protocol (`bam_jax.evaluate.logreg`) against
scikit-learn's `LogisticRegression(solver='lbfgs')` on the same rows, on 1 and 4
devices, and `python -m bam_jax.evaluate --config.protocols=logreg` on MNIST pixels.
"""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from bam_jax.evaluate import logreg
from conftest import data_mesh
from test_evaluate import evaluate, succeeded

CLASSES, DIM = 5, 20


def blobs(n, seed):
    """Overlapping Gaussian classes (not separable, so every λ has a finite optimum)."""
    centres = np.random.default_rng(0).normal(0, 1, (CLASSES, DIM))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    return (centres[labels] + rng.normal(0, 1.5, (n, DIM))).astype(np.float32), labels


def mean_objective(kernel, bias, x, y, l2):
    """The module's objective in float64 NumPy, for any (W, b)."""
    z = x.astype(np.float64) @ kernel + bias
    z -= z.max(axis=1, keepdims=True)
    cross_entropy = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return cross_entropy.mean() + 0.5 * l2 * np.sum(np.square(kernel))


def scikit_learn(x, y, l2):
    """scikit-learn's fit with this λ, converged tightly in float64."""
    return LogisticRegression(C=logreg.sklearn_c(l2, len(y)), tol=1e-10,
                              max_iter=10_000).fit(x.astype(np.float64), y)


def test_fit_matches_scikit_learn_and_sharding_changes_nothing():
    x, y = blobs(400, seed=1)
    x_test, y_test = blobs(1000, seed=2)
    weights = {}
    for devices in (1, 4):
        mesh = data_mesh(devices)
        train, test = logreg.shard_rows(x, y, mesh), logreg.shard_rows(x_test, y_test, mesh)
        for l2 in (1e-3, 1e-1):
            fitted = logreg.fit(train.features, train.labels, train.valid, np.float32(l2),
                                num_classes=CLASSES, mesh=mesh, tol=1e-6)
            kernel, bias = (np.asarray(fitted.params[k], np.float64) for k in ('kernel', 'bias'))
            weights[devices, l2] = kernel
            reference = scikit_learn(x, y, l2)
            mine = mean_objective(kernel, bias, x, y, l2)
            theirs = mean_objective(reference.coef_.T, reference.intercept_, x, y, l2)
            assert abs(mine - theirs) / theirs < 1e-6  # asked: 1e-4; measured ~1e-9
            assert float(fitted.loss) == pytest.approx(mine, rel=1e-5)  # float32 on device
            top1 = logreg.accuracy(fitted.params, test.features, test.labels, test.valid,
                                   mesh=mesh)
            assert abs(top1 - 100 * reference.score(x_test, y_test)) <= 0.1
            assert int(fitted.iterations) < 1000 and float(fitted.grad_norm) <= 1e-6
    for l2 in (1e-3, 1e-1):  # 1 and 4 devices: the same optimum, each within tol / λ of
        # it (strong convexity μ = λ), the fits differing only in summation order
        assert np.abs(weights[4, l2] - weights[1, l2]).max() <= 2e-6 / l2


def test_sweep_picks_the_lambda_scikit_learn_picks():
    """On the carved split: the validation top-1 of every λ, the λ picked and the refit's
    test top-1 are scikit-learn's on the same rows."""
    x, y = blobs(500, seed=3)
    x_test, y_test = blobs(1000, seed=5)
    mesh = data_mesh(4)
    result = logreg.transfer(
        logreg.shard_rows(x, y, mesh), logreg.shard_rows(x_test, y_test, mesh), mesh=mesh,
        num_classes=CLASSES, num_lambdas=8, validation_fraction=0.4,
        lambda_range=(1e-4, 1e3), tol=1e-6)  # at 1e-6, κ = 1e6: float32 L-BFGS stops short
    held_out = logreg.validation_mask(y, np.ones(len(y), bool), 0.4, seed=0)
    assert held_out.sum() == 200  # 40 of each class
    values = logreg.lambdas(8, 1e-4, 1e3)
    assert [row['lambda'] for row in result['sweep']] == pytest.approx(list(values))
    theirs = [100 * scikit_learn(x[~held_out], y[~held_out], l2).score(x[held_out],
                                                                       y[held_out])
              for l2 in values]
    np.testing.assert_allclose([row['top1'] for row in result['sweep']], theirs, atol=0.1)
    assert theirs[-1] < max(theirs) > theirs[0]  # a choice: neither end of the range
    assert result['lambda'] == pytest.approx(values[int(np.argmax(theirs))])
    refit = scikit_learn(x, y, result['lambda'])  # on train + validation
    assert abs(result['top1'] - 100 * refit.score(x_test, y_test)) <= 0.1
    assert result['train_rows'] == 500
    assert result['C'] == pytest.approx(logreg.sklearn_c(result['lambda'], 500))


def test_validation_carve_is_class_balanced_and_skips_padding():
    labels = np.repeat(np.arange(4), [30, 25, 40, 25])
    valid = np.ones(len(labels), bool)
    valid[:10] = False  # padding rows are never held out
    mask = logreg.validation_mask(labels, valid, 0.2, seed=0)
    assert not mask[:10].any()
    assert np.bincount(labels[mask], minlength=4).tolist() == [5] * 4  # floor(110·0.2 / 4)
    mesh = data_mesh(1)
    split = logreg.shard_rows(*blobs(40, seed=0), mesh)
    with pytest.raises(ValueError, match='the validation or the training part is empty'):
        logreg.transfer(split, split, mesh=mesh, num_classes=CLASSES, validation_fraction=1.0)


def test_command_on_mnist_pixels_with_a_named_validation_split(tmp_path):
    """The command, with MNIST's test split standing in for a validation split (the
    default carve is tested above): the refit takes train + that split."""
    out = tmp_path / 'logreg.json'
    result = evaluate('--run_config=configs/mnist.py', '--features=pixels',
                      '--config.pixels_size=8', '--config.protocols=logreg',
                      '--config.logreg.num_lambdas=3', '--config.logreg.max_iters=60',
                      '--config.logreg.validation_split=test', '--out', out)
    numbers = succeeded(result, out)['results']['logreg']
    assert [row['lambda'] for row in numbers['sweep']] == pytest.approx([1e5, 0.3162, 1e-6],
                                                                         rel=1e-3)
    best = max(numbers['sweep'], key=lambda row: row['top1'])
    assert (numbers['lambda'], numbers['validation_top1']) == (best['lambda'], best['top1'])
    assert numbers['train_rows'] == 5000  # 4,000 train + 1,000 validation digits
    assert 80 < numbers['top1'] <= 100  # raw 8×8 pixels; chance: 10


def test_a_missing_validation_split_is_named_before_any_feature():
    from bam_jax.evaluate import runner
    from configs import evaluate as evaluate_config, mnist

    config = evaluate_config.get_config()
    config.logreg.validation_split = 'nope'
    evaluation = runner.Evaluation(config, mnist.get_config(),
                                   runner.Subject('pixels', None, None, {}))
    with pytest.raises(runner.EvaluationError, match="validation_split: .*not 'nope'"):
        evaluation.check(['logreg'])
