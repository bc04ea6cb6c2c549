r"""TFRecord → ArrayRecord conversion speed (`bam_jax.data.convert`), and ImageNet's cost.

Builds a TFDS data set in TFRecord format of ImageNet-sized records (≈110 KB JPEGs of
scikit-image's bundled CC0 photos, 640×480, quality 95; ImageNet's train split is
1,281,167 records in ≈140 GB, 109 KB each), converts it with 1 worker and with one worker
per core, and extrapolates to ImageNet's train split on this machine. A one-core
breakdown times the TFRecord reading and the ArrayRecord writing apart.

  python benchmarks/convert_throughput.py [--records 3000] [--shards 16] [--workers N]

Prints a table and one JSON line. Wall-clock rates fall when other processes share the
cores; rates per CPU-second (this process's and its workers' user + system time) do not,
and are what idle cores would give.
"""

import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from bam_jax.data import convert as convert_lib  # noqa: E402

PHOTOS = ('chelsea', 'coffee', 'astronaut', 'rocket', 'hubble_deep_field', 'immunohistochemistry')
IMAGENET_TRAIN_RECORDS = 1_281_167
IMAGENET_TRAIN_BYTES = 140e9
NAME = 'convert_benchmark'


def jpeg_records(count: int, variants: int = 60, seed: int = 0) -> list[bytes]:
    """`count` JPEGs cycling over `variants` random crops of the photos, each 640×480, q95."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(data, name)()).convert('RGB') for name in PHOTOS]
    encoded = []
    for index in range(variants):
        photo = photos[index % len(photos)]
        width, height = (int(side * rng.uniform(0.7, 1)) for side in photo.size)
        left = int(rng.integers(photo.width - width + 1))
        top = int(rng.integers(photo.height - height + 1))
        buffer = io.BytesIO()
        photo.crop((left, top, left + width, top + height)).resize(
            (640, 480), Image.BICUBIC).save(buffer, format='JPEG', quality=95)
        encoded.append(buffer.getvalue())
    return [encoded[index % variants] for index in range(count)]


def build_tfrecord_dataset(data_dir: str, records: list[bytes], shards: int) -> None:
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=1000)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name=NAME, version='1.0.0', features=features, data_dir=data_dir,
        split_datasets={'train': [(index, {'image': record, 'label': index % 1000})
                                  for index, record in enumerate(records)]},
        file_format='tfrecord', disable_shuffling=True,
        download_config=tfds.download.DownloadConfig(num_shards=shards))


def _timed(function):
    """(result, wall seconds, CPU seconds of this process and of its reaped children)."""
    def cpu():
        return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    wall, cpu_start = time.perf_counter(), cpu()
    result = function()
    return result, time.perf_counter() - wall, cpu() - cpu_start


def one_core_breakdown(path: str, scratch: str, repeats: int = 3):
    """(MB/s, MB per CPU-second) of reading one TFRecord shard and of writing its records
    as ArrayRecord, the fastest of `repeats` runs so that warm-up is left out; and each
    ArrayRecord file's size over the records' size."""
    from array_record.python import array_record_module

    def best(function):
        runs = [_timed(function) for _ in range(repeats)]
        return runs[0][0], min(run[1] for run in runs), min(run[2] for run in runs)

    batches, wall, cpu = best(lambda: list(convert_lib.read_tfrecord(path)))
    records = [record for batch in batches for record in batch]
    megabytes = sum(map(len, records)) / 1e6
    rates = {'one core: read TFRecord (tf.data)': (megabytes / wall, megabytes / cpu)}
    sizes = {}
    for label, options in (('one core: write ArrayRecord, TFDS options',
                            convert_lib.ARRAY_RECORD_OPTIONS),
                           ('one core: write ArrayRecord, uncompressed (reference)',
                            'group_size:1,uncompressed')):
        output = os.path.join(scratch, 'breakdown.array_record')

        def write():
            writer = array_record_module.ArrayRecordWriter(output, options)
            for record in records:
                writer.write(record)
            writer.close()
        _, wall, cpu = best(write)
        rates[label] = (megabytes / wall, megabytes / cpu)
        sizes[options] = os.path.getsize(output) / 1e6 / megabytes
    return rates, sizes


def _import_tensorflow():
    """A worker's start-up, kept out of the timed copies."""
    import tensorflow  # noqa: F401
    from array_record.python import array_record_module  # noqa: F401


def _copy_timed(shard: convert_lib.Shard) -> tuple[int, float, float]:
    """`copy_shard` in a worker: (bytes, wall seconds, this worker's CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    num_bytes = convert_lib.copy_shard(shard)
    return num_bytes, time.perf_counter() - wall, time.process_time() - cpu


def parallel_copy(shards: list, workers: int) -> tuple[tuple[float, float], float]:
    """Per-worker (MB/s, MB per CPU-s) timed inside `workers` spawned workers, as
    `convert --workers` runs them, and the pool's wall seconds beyond the copying (the
    workers' start-up: imports of TensorFlow and JAX)."""
    context = multiprocessing.get_context('spawn')
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_import_tensorflow) as pool:
        results = list(pool.map(_copy_timed, shards))
    megabytes = sum(result[0] for result in results) / 1e6
    busy = sum(result[1] for result in results)
    rates = (megabytes / busy, megabytes / sum(result[2] for result in results))
    return rates, time.perf_counter() - start - busy / workers


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--records', type=int, default=3000)
    parser.add_argument('--shards', type=int, default=16)
    parser.add_argument('--workers', type=int, default=os.cpu_count())
    args = parser.parse_args()
    cores = os.cpu_count()

    with tempfile.TemporaryDirectory() as root:
        data_dir = os.path.join(root, 'tfrecord')
        build_tfrecord_dataset(data_dir, jpeg_records(args.records), args.shards)
        source_dir = os.path.join(data_dir, NAME, '1.0.0')
        rates, sizes = one_core_breakdown(
            os.path.join(source_dir, f'{NAME}-train.tfrecord-00000-of-{args.shards:05d}'), root)
        converted, wall, cpu = _timed(lambda: convert_lib.convert(
            NAME, data_dir, os.path.join(root, 'array_record')))
        assert converted.splits == {'train': args.records}
        megabytes = converted.num_bytes / 1e6
        rows = {'convert, 1 worker': (megabytes / wall, megabytes / cpu)}
        start_up = 0.0
        if args.workers > 1:
            import tensorflow_datasets as tfds

            info = tfds.builder(NAME, data_dir=data_dir).info
            target_dir = os.path.join(root, 'parallel')
            os.makedirs(target_dir)
            rows[f'{args.workers} workers, per worker'], start_up = parallel_copy(
                convert_lib.split_shards(info.splits['train'], target_dir), args.workers)
        rows.update(rates)

    record_kb = megabytes * 1e3 / args.records
    per_worker_wall, per_cpu_second = rows[list(rows)[1 if args.workers > 1 else 0]]
    # ImageNet train with one worker per core: at the wall rate measured here (a shared
    # machine) and at the CPU rate (what idle cores would give), plus the workers' start-up.
    imagenet_minutes = (start_up + IMAGENET_TRAIN_BYTES / 1e6 / (per_worker_wall * cores)) / 60
    idle_minutes = (start_up + IMAGENET_TRAIN_BYTES / 1e6 / (per_cpu_second * cores)) / 60

    print(f'{args.records} records of {record_kb:.0f} KB ({megabytes:.0f} MB of serialized '
          f'tf.Example), {args.shards} TFRecord shards; {cores} cores; start-up of '
          f'{args.workers} workers: {start_up:.1f} s')
    width = max(map(len, rows))
    print(f'{"step":<{width}}  MB/s (wall)  records/s (wall)  MB per CPU-s  records per CPU-s')
    for label, (wall_rate, cpu_rate) in rows.items():
        print(f'{label:<{width}}  {wall_rate:11.1f}  {wall_rate * 1e3 / record_kb:16.0f}  '
              f'{cpu_rate:12.1f}  {cpu_rate * 1e3 / record_kb:16.0f}')
    print('ArrayRecord file size / record bytes: ' + ', '.join(
        f'{options} {ratio:.4f}' for options, ratio in sizes.items()))
    print(f'ImageNet train (1,281,167 records, ~140 GB), one worker per core on {cores} cores: '
          f'{imagenet_minutes:.0f} min at the wall rate measured here, {idle_minutes:.0f} min '
          'at the CPU rate (idle cores)')
    print(json.dumps({
        'records': args.records, 'record_kb': round(record_kb, 1), 'shards': args.shards,
        'workers': args.workers, 'cores': cores, 'start_up_s': round(start_up, 2),
        **{label: {'mb_per_s': round(wall_rate, 1), 'mb_per_cpu_s': round(cpu_rate, 1)}
           for label, (wall_rate, cpu_rate) in rows.items()},
        'array_record_size_over_records': {key: round(value, 4) for key, value in sizes.items()},
        'imagenet_train_minutes_wall_rate': round(imagenet_minutes, 1),
        'imagenet_train_minutes_cpu_rate': round(idle_minutes, 1)}))


if __name__ == '__main__':
    main()
