r"""TFDS TFRecord → ArrayRecord without Apache Beam, so `tfds.data_source` can read it.

  python -m bam_jax.data.convert --name imagenet2012 --data_dir DIR --out_dir DIR2
      [--splits train,validation] [--workers N] [--overwrite]

Each TFRecord shard becomes one ArrayRecord shard holding the same serialized
`tf.Example` bytes in the same order, named by TFDS's own file template
(`imagenet2012-train.array_record-00000-of-01024`) and written with the options TFDS's
ArrayRecord adapter uses (`group_size:1`: one record per chunk, so any record is one seek
away). Reading TFRecords needs TensorFlow; `tf.io.gfile` makes `gs://` paths work.

The copy is `DIR2/<name>[/<config>]/<version>/`, a TFDS data_dir of its own whose
`dataset_info.json` says `fileFormat: array_record` and lists the converted splits with
their shard lengths. It is built in a temporary directory beside it and renamed into
place at the end, so an interrupted run leaves no half-written data set.

There is no in-place mode: TFDS's convention for one (`array_record` added to
`alternativeFileFormats`) is ignored by `tfds.data_source` for registered data sets such
as imagenet2012 in tfds 4.9.10, whose `DatasetInfo` keeps the formats its code declares.
"""

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import sys
import tempfile
import time
import uuid

from bam_jax import command_line, lifetime
from bam_jax.data.sources import DataError

# What TFDS's `ArrayRecordFileAdapter.write_examples` passes to `ArrayRecordWriter`
# (tfds 4.9.10); the compression is the writer's default (brotli, level 6).
ARRAY_RECORD_OPTIONS = 'group_size:1'
DATASET_INFO = 'dataset_info.json'
_READ_BATCH = 64  # records per `TFRecordDataset` batch: amortises per-element overhead
_READ_BUFFER = 8 << 20  # bytes; large reads matter on gs://
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Shard:
    source: str  # the TFRecord file
    target: str  # the ArrayRecord file, in the temporary directory
    num_records: int  # from dataset_info.json; the copy is checked against it


@dataclasses.dataclass(frozen=True)
class Converted:
    directory: str  # the ArrayRecord copy: <out_dir>/<name>[/<config>]/<version>
    splits: dict[str, int]  # records per converted split
    num_shards: int
    num_bytes: int  # serialized records copied
    seconds: float


def _tensorflow():
    import tensorflow as tf  # Deferred: seconds of imports.
    return tf


def _is_local(path: str) -> bool:
    return '://' not in path


def _same_directory(first: str, second: str) -> bool:
    if _is_local(first) and _is_local(second):
        return os.path.realpath(first) == os.path.realpath(second)
    return first.rstrip('/') == second.rstrip('/')


def _prepared_builder(name: str, data_dir: str):
    """The TFDS builder `TfdsSource` would use for (name, data_dir), prepared on disk."""
    import tensorflow_datasets as tfds

    # A local path is checked without TensorFlow, so that name errors come back fast.
    if not (os.path.isdir(data_dir) if _is_local(data_dir)
            else _tensorflow().io.gfile.isdir(data_dir)):
        raise DataError(f'--data_dir {data_dir!r} is not a directory.')
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f'No TFDS data set {name!r}: it is not registered with TFDS and there is no '
            f'{os.path.join(data_dir, name.split(":")[0])}/<version>/{DATASET_INFO}.') from None
    except (ValueError, AssertionError) as error:  # a malformed name, a version not in code
        raise DataError(f'TFDS cannot make a builder for --name {name!r}: '
                        f'{str(error).splitlines()[0]}') from None
    if not builder.is_prepared():
        gfile = _tensorflow().io.gfile
        parent = os.path.dirname(builder.data_dir)
        found = [entry.rstrip('/') for entry in
                 (gfile.listdir(parent) if gfile.isdir(parent) else [])
                 if gfile.exists(os.path.join(parent, entry, DATASET_INFO))]
        hint = (f'; prepared versions there: {", ".join(sorted(found))} (pass --name '
                f'{name.split(":")[0]}:<version>)') if found else ''
        raise DataError(f'TFDS data set {name!r} is not prepared in {data_dir}: looked for '
                        f'{os.path.join(builder.data_dir, DATASET_INFO)}{hint}.')
    return builder


def split_shards(split_info, target_dir: str) -> list[Shard]:
    """TFRecord shard → ArrayRecord shard pairs, both named by the split's TFDS template."""
    from tensorflow_datasets.core.file_adapters import FileFormat

    source_template = split_info.filename_template
    target_template = source_template.replace(
        filetype_suffix=FileFormat.ARRAY_RECORD.file_suffix)
    num_shards = len(split_info.shard_lengths)
    shards = []
    for index, length in enumerate(split_info.shard_lengths):
        source = source_template.sharded_filepath(shard_index=index, num_shards=num_shards)
        target = target_template.sharded_filepath(shard_index=index, num_shards=num_shards)
        shards.append(Shard(os.fspath(source), os.path.join(target_dir, target.name),
                            int(length)))
    return shards


def _converted_info(text: str, splits: list[str]) -> str:
    """dataset_info.json for the ArrayRecord copy; every other field is kept as it was."""
    info = json.loads(text)
    info['fileFormat'] = 'array_record'
    info.pop('alternativeFileFormats', None)  # their shards are not copied
    info['splits'] = [split for split in info['splits'] if split['name'] in splits]
    return json.dumps(info, indent=2, sort_keys=True) + '\n'


def read_tfrecord(path: str):
    """Yields one TFRecord file's serialized records in order, in NumPy batches of bytes."""
    import tensorflow as tf

    records = tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER)
    yield from records.batch(_READ_BATCH).as_numpy_iterator()


def copy_shard(shard: Shard) -> int:
    """Copies one TFRecord shard's records into one ArrayRecord file; returns their bytes.

    ArrayRecord writes local files only, so a `gs://` target is written locally first.
    """
    import tensorflow as tf
    from array_record.python import array_record_module

    num_records = num_bytes = 0
    with tempfile.TemporaryDirectory() as scratch:
        path = (shard.target if _is_local(shard.target)
                else os.path.join(scratch, os.path.basename(shard.target)))
        writer = array_record_module.ArrayRecordWriter(path, ARRAY_RECORD_OPTIONS)
        try:
            for batch in read_tfrecord(shard.source):
                for record in batch:
                    writer.write(record)
                num_records += len(batch)
                num_bytes += sum(map(len, batch))
        except tf.errors.OpError as error:
            reason = re.sub(r'\{\{.*?\}\}|\[Op:.*', '', error.message).strip()
            raise DataError(f'Cannot read TFRecord shard {shard.source}: {reason}') from None
        finally:
            writer.close()
        if num_records != shard.num_records:
            raise DataError(f'{shard.source} holds {num_records} records but {DATASET_INFO} '
                            f'says {shard.num_records}: the data set is damaged.')
        if path != shard.target:
            tf.io.gfile.copy(path, shard.target, overwrite=True)
    return num_bytes


def copy_shards(shards: list[Shard], workers: int):
    """Yields each shard's bytes as it is copied, in `workers` processes if more than one."""
    if workers <= 1:
        yield from map(copy_shard, shards)
        return
    # Spawned, not forked: TensorFlow's runtime does not survive a fork.
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn'),
        initializer=lifetime.end_with_parent)
    try:
        yield from pool.map(copy_shard, shards)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, run no further shard


def convert(name: str, data_dir: str, out_dir: str, splits: list[str] | None = None,
            workers: int = 1, overwrite: bool = False) -> Converted:
    """Copies the prepared TFRecord data set `name` in `data_dir` to ArrayRecord in `out_dir`."""
    from tensorflow_datasets.core.file_adapters import FileFormat

    start = time.perf_counter()
    builder = _prepared_builder(name, data_dir)
    info, source_dir = builder.info, builder.data_dir
    if info.file_format == FileFormat.ARRAY_RECORD:
        raise DataError(f'{name!r} in {source_dir} is already in ArrayRecord format; '
                        'TfdsSource reads it as it is.')
    if info.file_format != FileFormat.TFRECORD:
        raise DataError(f'{name!r} in {source_dir} is stored as {info.file_format.value}; '
                        'only TFRecord data sets can be converted.')
    all_splits = list(info.splits)
    splits = splits or all_splits
    for split in splits:
        if split not in all_splits:
            raise DataError(f'{name!r} has no split {split!r}; it has {", ".join(all_splits)}.')

    target_dir = os.path.join(out_dir, info.name,
                              *([info.config_name] if info.config_name else []),
                              str(info.version))
    tf = _tensorflow()  # from here on
    gfile = tf.io.gfile
    if _same_directory(target_dir, source_dir):
        raise DataError(f'--out_dir {out_dir} would overwrite the TFRecord data set itself; '
                        'choose another directory.')
    if gfile.exists(target_dir) and not overwrite:
        raise DataError(f'{target_dir} already exists: pass --overwrite to replace it, or '
                        'choose another --out_dir.')
    staging = os.path.join(os.path.dirname(target_dir),
                           f'incomplete.{uuid.uuid4().hex}_{info.version}')
    shards = {split: split_shards(info.splits[split], staging) for split in all_splits}
    existing = set(gfile.listdir(source_dir))
    for pairs in shards.values():
        for shard in pairs:
            if os.path.basename(shard.source) not in existing:
                raise DataError(f'{shard.source} is missing: the TFRecord data set in '
                                f'{source_dir} is incomplete.')
    chosen = [shard for split in splits for shard in shards[split]]

    gfile.makedirs(staging)
    try:
        num_bytes = 0
        for done, shard_bytes in enumerate(copy_shards(chosen, workers), 1):
            num_bytes += shard_bytes
            if done == len(chosen) or done % max(1, len(chosen) // 20) == 0:
                _log.info('%d/%d shards, %.0f MB, %.1f MB/s', done, len(chosen),
                          num_bytes / 1e6, num_bytes / 1e6 / (time.perf_counter() - start))
        # Everything else in the version directory: features.json, label names, ...
        sources = {os.path.basename(shard.source)
                   for pairs in shards.values() for shard in pairs}
        for entry in existing - sources - {DATASET_INFO}:
            if not gfile.isdir(os.path.join(source_dir, entry)):
                gfile.copy(os.path.join(source_dir, entry), os.path.join(staging, entry))
        with gfile.GFile(os.path.join(source_dir, DATASET_INFO)) as file:
            info_text = _converted_info(file.read(), splits)
        with gfile.GFile(os.path.join(staging, DATASET_INFO), 'w') as file:
            file.write(info_text)
        if gfile.exists(target_dir):
            gfile.rmtree(target_dir)
        if _is_local(target_dir):
            os.rename(staging, target_dir)
        else:  # Object stores rename file by file; dataset_info.json goes last.
            gfile.makedirs(target_dir)
            for entry in sorted(gfile.listdir(staging), key=lambda entry: entry == DATASET_INFO):
                gfile.rename(os.path.join(staging, entry), os.path.join(target_dir, entry))
    finally:
        try:
            if gfile.exists(staging):
                gfile.rmtree(staging)
        except tf.errors.NotFoundError:  # a stale directory entry after a remote rename
            pass
    return Converted(target_dir, {split: info.splits[split].num_examples for split in splits},
                     len(chosen), num_bytes, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = command_line.argument_parser('python -m bam_jax.data.convert', __doc__)
    parser.add_argument('--name', help='TFDS name: dataset[/config][:version]')
    parser.add_argument('--data_dir', help='the TFDS data_dir holding <name>/<version>/ '
                        '(local or gs://)')
    parser.add_argument('--out_dir', help='the TFDS data_dir the ArrayRecord copy goes to')
    parser.add_argument('--splits', help='comma-separated splits to convert (default: all)')
    parser.add_argument('--workers', type=int, default=os.cpu_count(),
                        help='processes converting shards in parallel (default: all cores)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing converted copy')
    args = parser.parse_args(argv)
    command_line.quiet_startup()  # before TensorFlow is imported
    logging.basicConfig(format='%(message)s')
    _log.setLevel(logging.INFO)  # progress lines; TFDS's own info stays quiet
    try:
        if not args.name:
            raise DataError('--name is missing: the TFDS data set to convert, e.g. '
                            '--name imagenet2012.')
        if not args.data_dir:
            raise DataError('--data_dir is missing: the TFDS data_dir holding '
                            f'{args.name}/<version>/dataset_info.json.')
        if not args.out_dir:
            raise DataError('--out_dir is missing: the new TFDS data_dir for the ArrayRecord '
                            f'copy, which goes to <out_dir>/{args.name}/<version>/.')
        if args.workers < 1:
            raise DataError(f'--workers must be at least 1, not {args.workers}.')
        converted = convert(args.name, args.data_dir, args.out_dir,
                            args.splits.split(',') if args.splits else None,
                            args.workers, args.overwrite)
    except DataError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return command_line.interrupted('the partial copy was removed')
    splits = ', '.join(f'{split} ({count} records)' for split, count in converted.splits.items())
    print(f'Converted {args.name} {splits}: {converted.num_shards} ArrayRecord shards, '
          f'{converted.num_bytes / 1e6:.1f} MB in {converted.seconds:.1f} s, now in '
          f'{converted.directory}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
