"""J&F of the DAVIS-2017 semi-supervised benchmark, in NumPy.

The definitions are those of the official toolkit (davis2017-evaluation,
`davis2017/metrics.py`, `utils.py`, `evaluation.py`), written again here so the project
scores its own masks:

- J, region similarity: IoU of an object's predicted and true masks; 1 when both are
  empty.
- F, boundary accuracy: the F-measure of the one-pixel boundaries (`boundary_map`, the
  BSDS `seg2bmap`), a boundary pixel counting as matched when the other boundary lies
  within a disk of radius ceil(0.008 · image diagonal) pixels. One empty boundary gives
  precision or recall 0 (the other 1), both empty give F = 1.
- Per object: Mean, Recall (the fraction of frames above 0.5) and Decay (the mean over
  the first quarter of the frames minus that over the last, quarters as the toolkit cuts
  them) of J and of F, over the frames but the first (the given mask) and the last.
- Global: the mean over all objects of every sequence; J&F-Mean is the mean of J-Mean
  and F-Mean.

As the toolkit's semi-supervised task: void pixels (255) count as background, the number
of objects is the first annotation's largest index, and a predicted index above it is an
error.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

BOUND_TH = 0.008  # boundary tolerance, a fraction of the image diagonal
RECALL_THRESHOLD = 0.5
DECAY_BINS = 4
VOID = 255


def region_similarity(truth: np.ndarray, prediction: np.ndarray) -> float:
    """J: the IoU of two boolean masks `[H, W]`; 1 if both are empty."""
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    union = np.count_nonzero(truth | prediction)
    return 1.0 if union == 0 else np.count_nonzero(truth & prediction) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a boolean mask `[H, W]`: pixels whose east, south or
    south-east neighbour differs from them (the boundary moved half a pixel towards the
    origin); on the last row only east, on the last column only south counts."""
    mask = mask.astype(bool)
    east, south, south_east = (np.zeros_like(mask) for _ in range(3))
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    boundary = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    boundary[-1, :] = mask[-1, :] ^ east[-1, :]
    boundary[:, -1] = mask[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk_dilation(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of `[H, W]` by the disk {x² + y² ≤ radius²}: for every row offset
    of the disk, a horizontal dilation by its half-width (a running count over a
    cumulative sum), shifted by that offset."""
    mask = mask.astype(bool)
    height, width = mask.shape
    padded = np.zeros((height, width + 2 * radius + 1), np.int32)
    np.cumsum(np.pad(mask, ((0, 0), (radius + 1, radius))), axis=1, out=padded)
    horizontal = {}
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in horizontal:
            # the row's pixels x - half .. x + half: a difference of the running sums
            start = radius + 1
            horizontal[half] = (padded[:, start + half:start + half + width]
                                - padded[:, start - half - 1:start - half - 1 + width]) > 0
        rows = horizontal[half]
        if dy >= 0:
            out[:height - dy] |= rows[dy:]
        else:
            out[-dy:] |= rows[:height + dy]
    return out


def boundary_radius(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """The matching tolerance: ceil(bound_th · diagonal) pixels; bound_th ≥ 1 is pixels."""
    return int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape)))


def boundary_measure(truth: np.ndarray, prediction: np.ndarray,
                     bound_th: float = BOUND_TH) -> float:
    """F: the boundary F-measure of two boolean masks `[H, W]` (module docstring)."""
    radius = boundary_radius(truth.shape, bound_th)
    truth_boundary, predicted_boundary = boundary_map(truth), boundary_map(prediction)
    n_truth, n_predicted = np.count_nonzero(truth_boundary), np.count_nonzero(
        predicted_boundary)
    if n_truth == 0 or n_predicted == 0:
        precision, recall = float(n_predicted == 0), float(n_truth == 0)
    else:
        precision = np.count_nonzero(
            predicted_boundary & disk_dilation(truth_boundary, radius)) / n_predicted
        recall = np.count_nonzero(
            truth_boundary & disk_dilation(predicted_boundary, radius)) / n_truth
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def statistics(per_frame: np.ndarray) -> dict[str, float]:
    """Mean, Recall and Decay of one object's per-frame J or F (the toolkit's
    `db_statistics`: quarters over indices round(linspace(1, n, 5)) - 1, each quarter
    including its end index)."""
    per_frame = np.asarray(per_frame, np.float64)
    ids = (np.round(np.linspace(1, len(per_frame), DECAY_BINS + 1) + 1e-10) - 1).astype(int)
    bins = [per_frame[ids[i]:ids[i + 1] + 1] for i in range(DECAY_BINS)]
    return {'mean': float(np.mean(per_frame)),
            'recall': float(np.mean(per_frame > RECALL_THRESHOLD)),
            'decay': float(np.mean(bins[0]) - np.mean(bins[-1]))}


def score_sequence(truth: np.ndarray, prediction: np.ndarray, *,
                   bound_th: float = BOUND_TH) -> dict[str, Any]:
    """J and F of one sequence's index masks `[T, H, W]` (true and predicted; the first
    and last frames are left out here).

    Returns {'objects': [{'J': {mean, recall, decay}, 'F': {...}}, ...] (object 1 first),
    'J': mean J over the objects, 'F': mean F, 'J&F': their mean}.
    """
    truth, prediction = np.asarray(truth), np.asarray(prediction)
    if truth.shape != prediction.shape or truth.ndim != 3:
        raise ValueError(f'truth and prediction must both be [T, H, W]; got {truth.shape} '
                         f'and {prediction.shape}.')
    if len(truth) < 3:
        raise ValueError(f'a sequence needs 3 frames to be scored (the first and last are '
                         f'left out); got {len(truth)}.')
    truth = np.where(truth == VOID, 0, truth)
    num_objects = int(truth[0].max())
    if int(prediction.max()) > num_objects:
        raise ValueError(f'the prediction has index {int(prediction.max())}, above the '
                         f'{num_objects} objects of the first annotation.')
    truth, prediction = truth[1:-1], prediction[1:-1]
    objects = []
    for index in range(1, num_objects + 1):
        masks = list(zip(truth == index, prediction == index))
        j = [region_similarity(t, p) for t, p in masks]
        f = [boundary_measure(t, p, bound_th) for t, p in masks]
        objects.append({'J': statistics(j), 'F': statistics(f)})
    j_mean = float(np.mean([o['J']['mean'] for o in objects])) if objects else float('nan')
    f_mean = float(np.mean([o['F']['mean'] for o in objects])) if objects else float('nan')
    return {'objects': objects, 'J': j_mean, 'F': f_mean, 'J&F': (j_mean + f_mean) / 2}


def global_scores(sequences: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The toolkit's global row over every object of every sequence (`score_sequence`
    results by name): J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay."""
    objects = [o for scores in sequences.values() for o in scores['objects']]
    row = {}
    for measure in ('J', 'F'):
        for name in ('mean', 'recall', 'decay'):
            row[f'{measure}-{name.capitalize()}'] = float(
                np.mean([o[measure][name] for o in objects]))
    return {'J&F-Mean': (row['J-Mean'] + row['F-Mean']) / 2, **row}
