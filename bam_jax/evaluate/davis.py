"""Video object segmentation by label propagation on DAVIS-2017 (DINO's protocol).

Value for value DINO's `eval_video_segmentation.py`, which BAM runs (its B10 aside):
each frame is resized (bilinear) to a short side of 480 with the long side floored to a
multiple of 64, normalised with mean (0.485, 0.456, 0.406) and std (0.228, 0.224,
0.225), and described by the ViT's last-block patch tokens after the final norm. The
first frame's annotation, resized (nearest) to the patch grid, gives one-hot labels.
Every later frame's labels are propagated from the first frame and the `n_last_frames`
previous ones: affinities exp(cos / 0.1) restricted to a square neighbourhood of radius
12 patches, the top 5 over all those frames kept per query patch and normalised to sum
to 1, soft labels averaged with them; then bilinear upsampling by the patch size,
per-channel min-max, argmax, and a nearest resize to the frame's size. The propagated
(not upsampled) soft labels join the queue.

In JAX: the frames of a sequence go through the backbone in batches sharded over the
'data' mesh, and each batch's propagation is one jitted `lax.scan` whose carry is a
fixed-size ring of `n_last_frames` features and soft labels: nothing recompiles per
frame, and memory is bounded by the ring and one batch, not by the video's length.

Departures, none of which changes a result: affinities are exp((cos - 1) / τ), the
same after normalisation and never overflowing; the label channels are the first
annotation's objects (DINO counts those surviving the resize to the patch grid); a
channel that is constant but positive is left at 0 by the min-max (DINO divides by 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from bam_jax.data.sources import DataError
from bam_jax.evaluate import jandf
from bam_jax.models.vit import VisionTransformer

OVERLAY_STRIP_FRAMES = 8
OVERLAY_GIF_WIDTH = 427  # half of a 480p frame
OVERLAY_ALPHA = 0.5
# TFDS's `davis` builder names DAVIS's 'val' split 'validation'.
TFDS_SPLITS = {'val': 'validation', 'train': 'train'}


def davis_palette() -> np.ndarray:
    """The PASCAL VOC / DAVIS colour map `[256, 3]` uint8: index i's bits, three at a time
    (red, green, blue), fill each channel from its highest bit down."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        code, colour = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[index] = colour
    return palette


def write_indexed_png(path: pathlib.Path, mask: np.ndarray) -> None:
    image = Image.fromarray(np.asarray(mask, np.uint8))
    image.putpalette(davis_palette().ravel().tolist())
    image.save(path, format='PNG')


# ---------------------------------------------------------------------------
# Sequences: DAVIS's own layout, or TFDS's `davis` builder.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Video:
    """One sequence: frame names (DAVIS's, without suffix), a reader of frame i (uint8
    `[H, W, 3]`) and of its annotation (uint8 index mask `[H, W]`, None if it has none)."""
    name: str
    frame_names: tuple[str, ...]
    read_frame: Callable[[int], np.ndarray]
    read_mask: Callable[[int], np.ndarray | None]

    def __len__(self) -> int:
        return len(self.frame_names)


def _read_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'))


class DavisFolder:
    """`root/JPEGImages/<resolution>/<seq>/*.jpg`, `root/Annotations/<resolution>/<seq>/
    *.png` (indexed PNGs) and `root/ImageSets/2017/<split>.txt`, as DAVIS ships them."""

    def __init__(self, root: str, resolution: str, split: str):
        self.root = pathlib.Path(root)
        listing = self.root / 'ImageSets' / '2017' / f'{split}.txt'
        if not self.root.is_dir():
            raise DataError(f'DAVIS root {root} does not exist (config.davis.root).')
        if not listing.is_file():
            raise DataError(f'{listing} not found: is {root} a DAVIS-2017 root, and is '
                            f'config.davis.split={split!r} one of its ImageSets/2017 lists?')
        self.names = [line.strip() for line in listing.read_text().splitlines()
                      if line.strip()]
        self.frames = self.root / 'JPEGImages' / resolution
        self.annotations = self.root / 'Annotations' / resolution

    def video(self, name: str) -> Video:
        frames = sorted((self.frames / name).glob('*.jpg'))
        if not frames:
            raise DataError(f'sequence {name!r}: no frames in {self.frames / name}.')
        first = self.annotations / name / f'{frames[0].stem}.png'
        if not first.is_file():
            raise DataError(f'sequence {name!r}: its first annotation {first} is missing.')
        for path in sorted((self.annotations / name).glob('*.png')):
            with Image.open(path) as image:
                if image.mode != 'P':
                    raise DataError(f'{path} is a {image.mode!r} PNG; DAVIS annotations '
                                    "are indexed ('P') PNGs.")

        def read_mask(index):
            path = self.annotations / name / f'{frames[index].stem}.png'
            if not path.is_file():
                return None
            with Image.open(path) as image:
                return np.asarray(image)

        return Video(name, tuple(path.stem for path in frames),
                     lambda index: _read_rgb(frames[index]), read_mask)


@contextlib.contextmanager
def _quiet():
    """TFDS's warnings held back (a missing dataset_info.json when looking for a set, no
    OpenCV to decode with): the command's output is its own lines, or one `error:`."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


class DavisTfds:
    """A prepared TFDS `davis` data set (ArrayRecord), read with `tfds.data_source`,
    decoded with PIL, without TensorFlow. Its `video/frames` are JPEGs and
    `video/segmentations` index masks; frames are named 00000, 00001, ... as in DAVIS.
    Listing the sequences decodes each record once."""

    def __init__(self, name: str, data_dir: str | None, split: str):
        import tensorflow_datasets as tfds  # deferred: a second of imports

        split = TFDS_SPLITS.get(split, split)
        where = f'{name} in data_dir={data_dir!r}'
        try:
            with _quiet():
                builder = tfds.builder(name, data_dir=data_dir)
                prepared = builder.is_prepared()
        except (tfds.core.registered.DatasetNotFoundError, ValueError) as error:
            raise DataError(f'unknown TFDS data set {where}: {error}') from None
        if not prepared:
            raise DataError(f'TFDS data set {where} is not prepared; set config.davis.root '
                            'to a DAVIS-2017 root, or prepare it with `tfds build '
                            f'{name} --file_format=array_record`.')
        file_format = builder.info.file_format
        if file_format is None or file_format.value != 'array_record':
            raise DataError(f'TFDS data set {where} is stored as {file_format}, which has '
                            'no random access; rebuild it with --file_format=array_record.')
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                            download=False)
        except ValueError as error:  # an unknown split
            raise DataError(f'TFDS data set {where}: {error}') from None
        self._index = {}
        for index in range(len(self._source)):
            with _quiet():
                video_name = self._source[index]['metadata']['video_name']
            self._index[video_name.decode() if isinstance(video_name, bytes)
                        else str(video_name)] = index
        self.names = sorted(self._index)

    def video(self, name: str) -> Video:
        with _quiet():
            example = self._source[self._index[name]]['video']
        frames, masks = example['frames'], example['segmentations']
        return Video(name, tuple(f'{index:05d}' for index in range(len(frames))),
                     lambda index: np.asarray(frames[index]),
                     lambda index: np.asarray(masks[index])[..., 0])


def make_source(settings) -> DavisFolder | DavisTfds:
    if settings.root:
        return DavisFolder(settings.root, settings.resolution, settings.split)
    return DavisTfds(settings.tfds_name, settings.tfds_data_dir, settings.split)


def select_videos(source, sequences: str) -> list[Video]:
    """The sequences named (comma-separated; '' = the whole split), checked and opened."""
    names = [name.strip() for name in sequences.split(',') if name.strip()] or source.names
    missing = [name for name in names if name not in source.names]
    if missing:
        raise DataError(f'sequences {missing} are not in the split (config.davis.sequences; '
                        f'it has {len(source.names)}: {", ".join(source.names[:5])}...).')
    return [source.video(name) for name in names]


# ---------------------------------------------------------------------------
# Frames → patch features.
# ---------------------------------------------------------------------------
def resized_shape(height: int, width: int, short_side: int, multiple: int
                  ) -> tuple[int, int]:
    """DINO's `read_frame`: the short side to `short_side`, the long side scaled alike and
    floored to a multiple of `multiple`."""
    if height > width:
        return int((short_side * height / width) // multiple * multiple), short_side
    return short_side, int((short_side * width / height) // multiple * multiple)


def check_backbone(backbone) -> None:
    if not isinstance(backbone, VisionTransformer):
        raise ValueError(f'label propagation needs a ViT\'s patch tokens; '
                         f'{type(backbone).__name__} has none.')


def _patch_tokens(module: VisionTransformer, images, norm: bool):
    """Last-block patch tokens `[N, P, D]`, through the final norm if `norm`."""
    tokens = module._embed(images)  # pylint: disable=protected-access
    for block in module.blocks:
        tokens, _ = block(tokens, False, False)
    return (module.norm(tokens) if norm else tokens)[:, 1:]


def frame_features_fn(backbone: VisionTransformer, variables, *, mean: Sequence[float],
                      std: Sequence[float], norm: bool
                      ) -> Callable[[jax.Array, tuple[int, int]], jax.Array]:
    """`(frames, size)` → unit-norm patch features `[B, h·w, D]` float32 of uint8 frames
    `[B, H, W, 3]` resized to `size` (bilinear, half-pixel centres, rounded to uint8
    values as OpenCV leaves them), scaled to [0, 1], normalised by `mean` and `std`."""
    @functools.partial(jax.jit, static_argnames='size')
    def features(variables, frames, size):
        frames = frames.astype(jnp.float32)
        if frames.shape[1:3] != size:
            frames = jax.image.resize(frames, (frames.shape[0], *size, 3), 'linear',
                                      antialias=False)
            frames = jnp.clip(jnp.round(frames), 0, 255)
        frames = (frames / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
        tokens = backbone.apply(variables, frames, norm, method=_patch_tokens)
        tokens = tokens.astype(jnp.float32)
        return tokens / jnp.maximum(jnp.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    return lambda frames, size: features(variables, frames, size)


# ---------------------------------------------------------------------------
# Label propagation: one `lax.scan` per batch of frames over a ring of past frames.
# ---------------------------------------------------------------------------
class Queue(NamedTuple):
    """The ring of the `n_last_frames` last frames: unit features `[n, P, D]`, soft labels
    `[n, P, C]`, which slots hold a frame `[n]`, and the slot written next."""
    features: jax.Array
    labels: jax.Array
    present: jax.Array
    slot: jax.Array


def empty_queue(n_last_frames: int, patches: int, dim: int, channels: int) -> Queue:
    return Queue(jnp.zeros((n_last_frames, patches, dim), jnp.float32),
                 jnp.zeros((n_last_frames, patches, channels), jnp.float32),
                 jnp.zeros((n_last_frames,), bool), jnp.zeros((), jnp.int32))


def neighbourhood(grid: tuple[int, int], radius: int) -> np.ndarray:
    """`[P, P]` bool: query patch and key patch at most `radius` rows and columns apart
    (all True if radius ≤ 0)."""
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    if radius <= 0:
        return np.ones((len(rows), len(rows)), bool)
    return ((np.abs(rows[:, None] - rows[None]) <= radius)
            & (np.abs(cols[:, None] - cols[None]) <= radius))


def first_labels(mask: np.ndarray, grid: tuple[int, int], channels: int) -> np.ndarray:
    """One-hot `[P, C]` of the first annotation resized (PIL nearest) to the patch grid."""
    small = np.asarray(Image.fromarray(mask).resize((grid[1], grid[0]),
                                                    Image.Resampling.NEAREST))
    return np.eye(channels, dtype=np.float32)[np.minimum(small, channels - 1).ravel()]


def propagate_one(target, context_features, context_labels, context_present, near, *,
                  topk: int, temperature: float):
    """Soft labels `[P, C]` of a target frame's unit features `[P, D]` from its context
    (`[n, P, D]`, `[n, P, C]`, `[n]` present), DINO's `label_propagation`."""
    cosine = jnp.einsum('qd,nkd->nqk', target, context_features)
    affinity = jnp.exp((cosine - 1.0) / temperature)
    affinity = jnp.where(near[None] & context_present[:, None, None], affinity, 0.0)
    # The topk-th largest over all context frames: that of each frame's top k.
    best = jax.lax.top_k(affinity, topk)[0].transpose(1, 0, 2).reshape(target.shape[0], -1)
    threshold = jax.lax.top_k(best, topk)[0][:, -1]
    affinity = jnp.where(affinity >= threshold[None, :, None], affinity, 0.0)
    affinity = affinity / jnp.sum(affinity, axis=(0, 2))[None, :, None]
    return jnp.einsum('nqk,nkc->qc', affinity, context_labels)


def label_map(soft: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
    """Soft labels `[P, C]` → uint8 indices `[h·p, w·p]`: bilinear upsampling by the patch
    size, per-channel min-max (channels whose maximum is positive), argmax."""
    height, width = grid[0] * patch_size, grid[1] * patch_size
    soft = soft.reshape(*grid, -1)
    upsampled = jax.image.resize(soft, (height, width, soft.shape[-1]), 'linear')
    low, high = upsampled.min(axis=(0, 1)), upsampled.max(axis=(0, 1))
    scaled = (upsampled - low) / jnp.where(high > low, high - low, 1.0)
    upsampled = jnp.where(high > 0, jnp.where(high > low, scaled, 0.0), upsampled)
    return jnp.argmax(upsampled, axis=-1).astype(jnp.uint8)


def propagate(queue: Queue, first_features, first_labels_, features, valid, *,
              grid: tuple[int, int], patch_size: int, radius: int, topk: int,
              temperature: float) -> tuple[Queue, jax.Array]:
    """Propagates to each of a batch of frames `[B, P, D]` in turn (`valid` False: padding,
    which leaves the queue as it was); returns the queue and uint8 masks `[B, h·p, w·p]`.
    Jit with `grid`, `patch_size`, `radius`, `topk`, `temperature` static."""
    near = jnp.asarray(neighbourhood(grid, radius))

    def step(queue, inputs):
        target, ok = inputs
        soft = propagate_one(
            target, jnp.concatenate([first_features[None], queue.features]),
            jnp.concatenate([first_labels_[None], queue.labels]),
            jnp.concatenate([jnp.ones((1,), bool), queue.present]), near,
            topk=topk, temperature=temperature)
        written = Queue(queue.features.at[queue.slot].set(target),
                        queue.labels.at[queue.slot].set(soft),
                        queue.present.at[queue.slot].set(True),
                        (queue.slot + 1) % queue.present.shape[0])
        queue = jax.tree.map(lambda new, old: jnp.where(ok, new, old), written, queue)
        return queue, label_map(soft, grid, patch_size)

    return jax.lax.scan(step, queue, (features, valid))


_propagate = jax.jit(propagate, static_argnames=('grid', 'patch_size', 'radius', 'topk',
                                                 'temperature'))


# ---------------------------------------------------------------------------
# A split: masks written as DAVIS PNGs, overlays, J&F.
# ---------------------------------------------------------------------------
def overlay(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The frame with each object's palette colour blended in."""
    colours = davis_palette()[mask].astype(np.float32)
    blended = np.where((mask > 0)[..., None],
                       (1 - OVERLAY_ALPHA) * frame + OVERLAY_ALPHA * colours, frame)
    return blended.astype(np.uint8)


def _write_overlays(directory: pathlib.Path, name: str, pictures: list[np.ndarray]) -> None:
    picks = np.unique(np.linspace(0, len(pictures) - 1, OVERLAY_STRIP_FRAMES).round()
                      .astype(int))
    Image.fromarray(np.concatenate([pictures[i] for i in picks], axis=1)).save(
        directory / f'{name}.png')
    scale = min(1.0, OVERLAY_GIF_WIDTH / pictures[0].shape[1])
    size = (round(pictures[0].shape[1] * scale), round(pictures[0].shape[0] * scale))
    frames = [Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR)
              for picture in pictures]
    frames[0].save(directory / f'{name}.gif', save_all=True, append_images=frames[1:],
                   duration=80, loop=0)


@dataclasses.dataclass(frozen=True)
class Settings:
    """`config.davis`'s propagation values and the backbone's patch size."""
    n_last_frames: tuple[int, ...]
    short_side: int
    long_side_multiple: int
    size_mask_neighborhood: int
    topk: int
    temperature: float
    batch_size: int
    overlay_sequences: int
    patch_size: int


def segment_video(video: Video, features_fn, settings: Settings, *, mesh,
                  out_dir: pathlib.Path, overlay_dir: pathlib.Path | None
                  ) -> dict[int, np.ndarray]:
    """Writes the propagated masks of one sequence for each `n_last_frames`
    (`out_dir/<n>/<seq>/<frame>.png`; the first frame is its annotation) and, if
    `overlay_dir`, its overlays; returns {n: index masks `[T, H, W]`}."""
    first_mask = video.read_mask(0)
    height, width = first_mask.shape
    size = resized_shape(height, width, settings.short_side, settings.long_side_multiple)
    grid = (size[0] // settings.patch_size, size[1] // settings.patch_size)
    channels = int(first_mask[first_mask != jandf.VOID].max(initial=0)) + 1
    rows = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    batch = settings.batch_size

    queues = masks = pictures = first_features = None
    for start in range(0, len(video), batch):
        indices = list(range(start, min(start + batch, len(video))))
        frames = [video.read_frame(index) for index in indices]
        padded = np.stack(frames + [frames[-1]] * (batch - len(frames)))
        features = jax.device_put(features_fn(jax.device_put(padded, rows), size),
                                  replicated)
        if first_features is None:  # the first batch: frame 0 is the given annotation
            first_features = features[0]
            labels0 = jax.device_put(first_labels(
                np.where(first_mask == jandf.VOID, 0, first_mask), grid, channels),
                replicated)
            queues = {n: jax.device_put(empty_queue(n, *features.shape[1:], channels),
                                        replicated) for n in settings.n_last_frames}
            masks = {n: [first_mask] for n in settings.n_last_frames}
            pictures = {n: [overlay(frames[0], first_mask)] for n in settings.n_last_frames}
        valid = jax.device_put((np.arange(start, start + batch) > 0)
                               & (np.arange(start, start + batch) < len(video)), replicated)
        for n in settings.n_last_frames:
            queues[n], small = _propagate(
                queues[n], first_features, labels0, features, valid, grid=grid,
                patch_size=settings.patch_size, radius=settings.size_mask_neighborhood,
                topk=settings.topk, temperature=settings.temperature)
            directory = out_dir / str(n) / video.name
            directory.mkdir(parents=True, exist_ok=True)
            for index, frame, mask in zip(indices, frames, np.asarray(small)):
                if index == 0:
                    mask = first_mask
                else:
                    mask = np.asarray(Image.fromarray(mask).resize(
                        (width, height), Image.Resampling.NEAREST))
                    masks[n].append(mask)
                    if overlay_dir is not None:
                        pictures[n].append(overlay(frame, mask))
                write_indexed_png(directory / f'{video.frame_names[index]}.png', mask)
    if overlay_dir is not None:
        for n in settings.n_last_frames:
            directory = overlay_dir / str(n)
            directory.mkdir(parents=True, exist_ok=True)
            _write_overlays(directory, video.name, pictures[n])
    return {n: np.stack(values) for n, values in masks.items()}


def evaluate_videos(videos: Sequence[Video], features_fn, settings: Settings, *, mesh,
                    out_dir: pathlib.Path, log: Callable[[str], None] = print
                    ) -> dict[str, Any]:
    """Segments and scores every video; masks in `out_dir/<n>/`, overlays of the first
    `settings.overlay_sequences` in `out_dir/overlays/<n>/`.

    Returns {'runs': [{'n_last_frames': n, 'global': the J&F row, 'sequences': {name:
    scores}}, ...]} (a run per `n_last_frames`); sequences without an annotation of
    every frame are segmented but not scored.
    """
    scores = {n: {} for n in settings.n_last_frames}
    for number, video in enumerate(videos):
        overlay_dir = out_dir / 'overlays' if number < settings.overlay_sequences else None
        masks = segment_video(video, features_fn, settings, mesh=mesh, out_dir=out_dir,
                              overlay_dir=overlay_dir)
        truth = [video.read_mask(index) for index in range(len(video))]
        scored = len(video) >= 3 and all(mask is not None for mask in truth)
        line = f'davis [{number + 1}/{len(videos)}] {video.name}: {len(video)} frames'
        for n, predicted in masks.items():
            if scored:
                scores[n][video.name] = jandf.score_sequence(np.stack(truth), predicted)
                line += f', J&F {scores[n][video.name]["J&F"]:.3f} (n_last_frames={n})'
        log(line + ('' if scored else ', not scored: it needs 3 frames, all annotated'))
    return {'runs': [{'n_last_frames': n, 'global': (jandf.global_scores(scores[n])
                                                     if scores[n] else {}),
                      'sequences': scores[n]} for n in settings.n_last_frames]}


def table(results: dict[str, Any]) -> list[str]:
    """The results as text: the global row per n_last_frames, then J&F, J, F per
    sequence."""
    lines = []
    for run in results['runs']:
        if run['global']:
            lines.append(f"n_last_frames={run['n_last_frames']}  " + '  '.join(
                f'{name} {value:.3f}' for name, value in run['global'].items()))
        width = max([len(name) for name in run['sequences']] + [8])
        lines.append(f"{'sequence':<{width}}  {'J&F':>6}  {'J':>6}  {'F':>6}")
        for name, scores in run['sequences'].items():
            lines.append(f"{name:<{width}}  {scores['J&F']:6.3f}  {scores['J']:6.3f}  "
                         f"{scores['F']:6.3f}")
    return lines
