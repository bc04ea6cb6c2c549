r"""The online kNN's start-up: reading every label of a TFDS ArrayRecord split.

Builds a TFDS data set in ArrayRecord format (TFDS's writer, 4 shards) of large JPEGs
(≈1-3 MB: crops of scikit-image's bundled photos, upscaled, quality 97), then times
  full:        what `eval_input.source_labels` did, `source[i]['label']` for every i
               (TFDS's `data_source` parses each whole example, image bytes included);
  labels-only: `TfdsSource.read_raw_labels()`, raw records in parallel threads and only
               the label parsed from the serialized tf.Example;
  label file:  `TfdsSource.read_labels()` once its label file exists (restarts, resumes);
  start-up:    what the online kNN waits for before training starts on a first start (no
               label file): the first record's label, and starting the labels-only read
               in a daemon thread (`train.online.make_online_knn`); the read then runs
               beside training and is awaited outside the timing.
Each is timed `--repeats` times in turns (the best kept) on the page-cached files, so
the comparison is of the work per record, not of the disk.

  python benchmarks/knn_labels.py [--records 300] [--repeats 3]

Prints a table and one JSON line. Wall time is shared with other processes; CPU seconds
(this process, all threads) are what the read costs.
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from bam_jax.data import eval_input, sources  # noqa: E402
from bam_jax.train import online  # noqa: E402

NAME = 'knn_labels_benchmark'
PHOTOS = ('chelsea', 'coffee', 'astronaut', 'rocket', 'immunohistochemistry')


def large_jpegs(count: int, variants: int = 12, seed: int = 0) -> list[bytes]:
    """`count` JPEGs cycling over `variants` crops of the photos, 1600-2400 px wide, q97,
    with fine noise so that they weigh what camera photos do (1-3 MB)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(data, name)()).convert('RGB') for name in PHOTOS]
    encoded = []
    for index in range(variants):
        photo = photos[index % len(photos)]
        width = int(rng.integers(1600, 2401))
        height = int(width * rng.uniform(0.6, 0.8))
        pixels = np.asarray(photo.resize((width, height), Image.BICUBIC), np.float32)
        pixels += rng.normal(0, 6, pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            buffer, format='JPEG', quality=97)
        encoded.append(buffer.getvalue())
    return [encoded[index % variants] for index in range(count)]


def build(data_dir: str, records: list[bytes]) -> None:
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=1000),
        'file_name': tfds.features.Text()})
    tfds.dataset_builders.store_as_tfds_dataset(
        name=NAME, version='1.0.0', features=features, data_dir=data_dir,
        split_datasets={'train': [(index, dict(image=record, label=index * 7 % 1000,
                                               file_name=f'{index}.JPEG'))
                                  for index, record in enumerate(records)]},
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(num_shards=4))


def timed(function):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--records', type=int, default=300)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        os.environ[sources.LABEL_CACHE_ENV] = os.path.join(root, 'labels')
        records = large_jpegs(args.records)
        build(os.path.join(root, 'data'), records)
        source = sources.TfdsSource(NAME, 'train', os.path.join(root, 'data'))
        expected = sorted(index * 7 % 1000 for index in range(args.records))

        def full():
            return np.asarray([source[index]['label'] for index in range(len(source))])

        def start_up():
            assert online._is_labelled(source)  # pylint: disable=protected-access
            return online._Background(source.read_raw_labels)  # pylint: disable=protected-access

        methods = {'full read (old source_labels)': full,
                   'labels-only read': source.read_raw_labels,
                   'label file': lambda: eval_input.source_labels(source),
                   'start-up, labels in the background': start_up}
        methods['label file']()  # writes the label file
        load_before = os.getloadavg()[0]
        best = {name: (float('inf'), float('inf')) for name in methods}
        for _ in range(args.repeats):
            for name, method in methods.items():
                labels, wall, cpu = timed(method)
                if isinstance(labels, online._Background):  # pylint: disable=protected-access
                    labels = labels.result()
                assert sorted(labels.tolist()) == expected, name
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        load_after = os.getloadavg()[0]
        megabytes = sum(map(len, records)) / 1e6

    full_wall, full_cpu = best['full read (old source_labels)']
    print(f'{args.records} records, {megabytes / args.records:.2f} MB of JPEG each '
          f'({megabytes:.0f} MB), 4 ArrayRecord shards; {os.cpu_count()} cores, load '
          f'{load_before:.1f} → {load_after:.1f}; best of {args.repeats}')
    width = max(map(len, methods))
    print(f'{"labels of the split":<{width}}  wall ms  CPU ms  wall / full  CPU / full')
    for name, (wall, cpu) in best.items():
        print(f'{name:<{width}}  {wall * 1e3:7.1f}  {cpu * 1e3:6.1f}  '
              f'{wall / full_wall:10.2%}  {cpu / full_cpu:9.2%}')
    print(json.dumps({
        'benchmark': 'knn_labels', 'records': args.records,
        'record_mb': round(megabytes / args.records, 2), 'cores': os.cpu_count(),
        'load_average': [load_before, load_after],
        **{name: {'wall_ms': round(wall * 1e3, 2), 'cpu_ms': round(cpu * 1e3, 2),
                  'wall_over_full': round(wall / full_wall, 4),
                  'cpu_over_full': round(cpu / full_cpu, 4)}
           for name, (wall, cpu) in best.items()}}))


if __name__ == '__main__':
    main()
