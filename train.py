r"""Pretrains a backbone with BAM, or fine-tunes one: the config's `task` chooses.

  python train.py                                  # the embedded MNIST default, on a CPU
  python train.py --config=configs/vit_small_imagenet.py --workdir=gs://BUCKET/bam_vits16 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.epochs=100

The configs/finetune_*.py configs fine-tune a pretrained backbone end to end with a
classification head (configs/finetune_mnist.py: the MNIST default run's), on the same
loop, checkpoints and resume rules.

Starting the same command again resumes from the workdir's newest intact checkpoint;
SIGTERM and Ctrl-C save the current step first. --from_step resumes from an earlier step,
--fresh starts afresh (the old run's files are moved aside, never deleted). On TPU pods
and SLURM jobs `jax.distributed` is initialised from the environment; elsewhere pass
--coordinator_address, --num_processes and --process_id to every process.
"""

import logging as python_logging
import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bam_jax import command_line

_CONFIG = command_line.define_config_file(
    'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'mnist.py'),
    'A configs/*.py file; override keys with --config.<key>=<value>.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Logs, checkpoints and the resolved config go here '
    '(default: runs/<config file name>).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs that '
    'JAX cannot detect (TPU pods and SLURM are detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0-based.')
_FROM_STEP = flags.DEFINE_integer(
    'from_step', None, 'Resume from this checkpoint step instead of the newest; later '
    'checkpoints are moved to WORKDIR/replaced/<time>/.')
_FRESH = flags.DEFINE_bool(
    'fresh', False, 'Start afresh in the workdir; the earlier run\'s files are moved to '
    'WORKDIR/replaced/<time>/.')
_FORCE_CONFIG = flags.DEFINE_bool(
    'force_config', False, 'Resume even though keys that define the run (batch_size, '
    'epochs, model, data, ...) differ from the saved run\'s.')


def _cluster_detected() -> bool:
    """A multi-process launch that `jax.distributed.initialize()` can read by itself."""
    if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
        return True
    return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '') or bool(
        os.environ.get('JAX_COORDINATOR_ADDRESS'))


class _QuietLibraries:
    """Keeps orbax's and grain's per-save / per-iterator INFO lines out of the run's log."""

    def filter(self, record) -> bool:
        noisy = '/orbax/' in record.pathname or '/grain/' in record.pathname
        return record.levelno >= python_logging.WARNING or not noisy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax  # after flag parsing, so --help and flag errors are instant
    command_line.skip_absent_tpu()

    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                   _PROCESS_ID.value)
    elif _cluster_detected():
        jax.distributed.initialize()

    from bam_jax.data.sources import DataError
    from bam_jax.train.builder import ConfigError
    from bam_jax.train.checkpoint import CheckpointError
    from bam_jax.train.loop import NonFiniteError, train_and_evaluate

    config = _CONFIG.value
    config_file = config_flags.get_config_filename(flags.FLAGS['config'])
    config_name = os.path.splitext(os.path.basename(config_file))[0]
    workdir = _WORKDIR.value or os.path.join('runs', config_name)
    logging.info('JAX process %d of %d, %d local / %d devices; workdir %s.',
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), workdir)
    try:
        result = train_and_evaluate(config, workdir, from_step=_FROM_STEP.value,
                                    fresh=_FRESH.value, force_config=_FORCE_CONFIG.value)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as error:
        sys.exit(f'error: {error}')
    except KeyboardInterrupt:  # before the first step: nothing to save yet
        sys.exit(command_line.interrupted('no step had run, nothing was saved'))
    if jax.process_index() == 0 and not result['signal']:  # stopped: the log said so
        print(_summary(result, workdir), flush=True)
    if result['signal']:
        sys.exit(128 + result['signal'])  # stopped early, resumable: as if killed by it


def _summary(result: dict, workdir: str) -> str:
    """Where the run's outputs are and what to run next: each command runs as printed."""
    if result.get('task') == 'finetune':
        return _finetune_summary(result, workdir)
    step, quoted = result['step'], shlex.quote(workdir)
    knn = ', '.join(f'{name.split("/")[-1]} {value:.1f} %'
                    for name, value in sorted(result.items()) if name.startswith('knn/'))
    if 'knn_pixels/top1' in result:
        knn += f'; raw pixels {result["knn_pixels/top1"]:.1f} % top-1 on the same split'
    lines = [
        f'The run finished at step {step}' + (f' (kNN {knn}).' if knn else '.')
        + (' It had finished before: nothing was recomputed.'
           if result['finished_before'] else ''),
        f'  {workdir}/checkpoints/   train state (student, EMA teacher, optimizer, input '
        'position)',
        f'  {workdir}/metrics.jsonl  every logged scalar (TensorBoard: tensorboard --logdir '
        f'{quoted})',
        f'  {workdir}/config.json    the resolved config',
        'Next:',
        f'  python -m bam_jax.runs {quoted}',
    ]
    if result['labelled']:
        lines.append(f'  python -m bam_jax.evaluate --workdir={quoted} --out={quoted}/eval.json')
    lines.append(f'  python -m bam_jax.export --workdir={quoted} '
                 f'--out={quoted}/backbone.safetensors')
    if not result['labelled']:
        lines.append('The evaluation needs labels, which this run\'s splits lack: evaluate '
                     'the exported backbone on labelled images (docs/evaluation.md).')
    return '\n'.join(lines)


def _finetune_summary(result: dict, workdir: str) -> str:
    step, quoted = result['step'], shlex.quote(workdir)
    if 'eval/top1' not in result:  # it had finished before: its last evaluation
        from bam_jax.train import metrics_log  # pylint: disable=import-outside-toplevel
        logged = [scalars for _, scalars in sorted(metrics_log.read_metrics(workdir).items())
                  if 'eval/top1' in scalars]
        result = {**result, **(logged[-1] if logged else {})}
    scores = (f' (top-1 {result["eval/top1"]:.2f} %, top-5 {result["eval/top5"]:.2f} % on '
              'the held-out split)' if 'eval/top1' in result else '')
    return '\n'.join([
        f'The fine-tuning run finished at step {step}{scores}.'
        + (' It had finished before: nothing was recomputed.'
           if result['finished_before'] else ''),
        f'  {workdir}/checkpoints/   train state (backbone + head, optimizer, input position)',
        f'  {workdir}/metrics.jsonl  every logged scalar, eval/top1 and eval/top5 at each '
        f'epoch\'s end (TensorBoard: tensorboard --logdir {quoted})',
        f'  {workdir}/config.json    the resolved config',
        'Next:',
        f'  python -m bam_jax.runs {quoted}',
        f'  python -m bam_jax.export --workdir={quoted} --out={quoted}/classifier.safetensors',
    ])


if __name__ == '__main__':
    command_line.run(main)
