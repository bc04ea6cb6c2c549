r"""Evaluates a frozen backbone with every protocol: kNN, linear probe, L-BFGS logistic
regression, few-shot, retrieval, k-means, attention maps, DAVIS video object segmentation.

  python -m bam_jax.evaluate --workdir DIR [--step N] [--weights teacher|student] \
    [--features checkpoint|random|pixels] [--out FILE.json] [--config.<key>=<value> ...]
  python -m bam_jax.evaluate --backbone FILE.safetensors|.pth [--run_config CONFIG] ...

The protocols and their settings are in `configs/evaluate.py` (`--config`). The run's
config (the workdir's `config.json`; for a file exported by `bam_jax.export`, the run
config kept in the JSON beside it; or `--run_config`: a `configs/*.py` file or a workdir's
`config.json`, overridable, `--run_config.model.depth=...`, for an official checkpoint or
a baseline without a workdir) gives the data defaults and, in its `evaluation` section, settings of its own
(the MNIST default's linear probe); `--config.<key>` overrides win over both.
`--features=random` evaluates the run's architecture at its random initialisation,
`--features=pixels` raw pixels. The results are printed as a table and written, all or
nothing, to `--out` (JSON); the attention figures go to the directory
`OUT_STEM.attention/`, the DAVIS masks and overlays to `OUT_STEM.davis/`. Bad input stops
with one `error:` line and exit status 1, before anything is written.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bam_jax import command_line

_REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
_CONFIG = command_line.define_config_file(
    'config', str(_REPOSITORY / 'configs' / 'evaluate.py'),
    'The protocols and their settings (configs/evaluate.py); override keys with '
    '--config.<key>=<value>.')
_RUN_CONFIG = command_line.define_config_file(
    'run_config', None, 'The training config (a configs/*.py file or a workdir\'s '
    'config.json) of the backbone (architecture and data) when there is no --workdir; '
    'override keys with --run_config.<key>=<value>.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (train.py --workdir).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
_WEIGHTS = flags.DEFINE_enum('weights', None, ['teacher', 'student'],
                             'Default: the teacher if the run has one.')
_BACKBONE = flags.DEFINE_string(
    'backbone', None, 'An exported backbone (.safetensors/.pth, with its JSON beside it) or '
    'an official BAM checkpoint (.pth), instead of a workdir checkpoint.')
_FEATURES = flags.DEFINE_enum('features', 'checkpoint', ['checkpoint', 'random', 'pixels'],
                              'What to evaluate: the checkpoint or file, the architecture '
                              'at random initialisation, or raw pixels.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the results (JSON).')


def _fail(message: str):
    """One `error:` line and exit status 1, at once: no library thread still winding
    down (orbax's, after a failed restore) gets to print at interpreter shutdown."""
    print(f'error: {message}', file=sys.__stderr__, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _run_config(workdir, backbone):
    from bam_jax import export
    if workdir is not None:
        if flags.FLAGS['run_config'].present:
            _fail('pass --workdir or --run_config, not both: a workdir has its config.json')
        config = export.load_run_config(workdir)
        if config.get('task', 'pretrain') == 'finetune':
            _fail(f'{workdir} is a fine-tuning run, whose top-1/top-5 are in its '
                  'metrics.jsonl; to evaluate its backbone, export it (python -m '
                  'bam_jax.export) and pass --backbone FILE --run_config CONFIG (the '
                  'pretraining config it started from)')
        return config
    if _RUN_CONFIG.value is None and backbone is not None:
        recorded = export.sidecar_run_config(backbone)
        if recorded is not None and recorded.get('task', 'pretrain') == 'finetune':
            _fail(f'{backbone} is a fine-tuned classifier: pass --run_config CONFIG (the '
                  'pretraining config it started from, for the evaluation\'s data and '
                  'sizes)')
        if recorded is not None:
            return recorded
    if _RUN_CONFIG.value is None:
        _fail('pass --workdir DIR, or --run_config CONFIG (a configs/*.py file or a '
              "workdir's config.json: the training config of --backbone FILE, or of a "
              '--features=random|pixels baseline)')
    return _RUN_CONFIG.value


def _output_paths(out: str | None, protocols
                  ) -> tuple[pathlib.Path | None, dict[str, pathlib.Path]]:
    """(--out, {protocol: its directory OUT_STEM.<protocol>}), checked before any work."""
    from bam_jax.evaluate.runner import FIGURES
    figures = [name for name in protocols if name in FIGURES]
    if out is None:
        if figures:
            _fail(f'the {figures[0]} protocol writes files: pass --out FILE.json')
        return None, {}
    out = pathlib.Path(out).absolute()
    if not out.parent.is_dir():
        _fail(f'output directory {out.parent} does not exist')
    if out.is_dir():
        _fail(f'--out {out} is a directory')
    directories = {name: out.with_name(f'{out.stem}.{name}') for name in figures}
    for directory in directories.values():
        if directory.exists():
            _fail(f'{directory} already exists; remove it or choose another --out')
    return out, directories


def _number(value) -> str:
    """Two decimals; three significant digits for what two decimals would hide (λ)."""
    if not isinstance(value, float):
        return str(value)
    return f'{value:.2f}' if value == 0 or 0.01 <= abs(value) < 1e6 else f'{value:.3g}'


def _table(results) -> list[str]:
    rows = [('protocol', 'metric', 'value')]
    for protocol, numbers in results.items():
        for name, value in numbers.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((protocol, name, _number(value)))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return [f'{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}'
            for row in rows]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.WARNING)  # progress goes to stdout, errors to stderr
    interrupt = command_line.ExitOnInterrupt('nothing was written')
    import jax
    command_line.skip_absent_tpu()
    from bam_jax import export
    from bam_jax.data.sources import DataError
    from bam_jax.evaluate import runner

    workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else None
    backbone = pathlib.Path(_BACKBONE.value) if _BACKBONE.value else None
    log = lambda line: print(line, flush=True)  # noqa: E731
    try:
        if backbone is not None and _FEATURES.value != 'checkpoint':
            _fail(f'--backbone is a checkpoint; it makes no sense with '
                  f'--features={_FEATURES.value}')
        if workdir is None and backbone is None and _FEATURES.value == 'checkpoint':
            _fail('pass --workdir DIR or --backbone FILE (or --features=random|pixels)')
        if workdir is not None and backbone is not None:
            _fail('pass --workdir or --backbone, not both')
        run_config = _run_config(workdir, backbone)
        config_flag = flags.FLAGS['config']
        config, settings = runner.protocol_config(
            _CONFIG.value, run_config, config_flags.get_override_values(config_flag),
            config_flags.get_config_filename(config_flag) if config_flag.present
            else 'configs/evaluate.py')
        protocols = runner.parse_protocols(config.protocols)
        out, directories = _output_paths(_OUT.value, protocols)
        log(settings)
        subject = runner.load_subject(_FEATURES.value, run_config, workdir=workdir,
                                      step=_STEP.value, weights=_WEIGHTS.value,
                                      backbone_file=backbone)
        evaluation = runner.Evaluation(config, run_config, subject, log=log,
                                       protocols=protocols)
        staging = {name: directory.with_name(f'.{directory.name}.{os.getpid()}.tmp')
                   for name, directory in directories.items()}

        def remove_staging():
            for directory in staging.values():
                shutil.rmtree(directory, ignore_errors=True)

        interrupt.cleanup = remove_staging
        try:
            for directory in staging.values():
                directory.mkdir()
            results, seconds = evaluation.run(protocols, out_dirs=staging)
            summary = {'features': subject.kind, **subject.description,
                       'model': run_config.model.to_dict(), 'data': evaluation.data.to_dict(),
                       'num_classes': evaluation.num_classes, 'devices': jax.device_count(),
                       'results': results, 'seconds': seconds, 'config': config.to_dict()}
            if out is not None and jax.process_index() == 0:
                with interrupt.deferred(f'the results were written to {out}'):
                    export.write_all({out: lambda path: path.write_text(
                        json.dumps(summary, indent=2) + '\n')})
                    for name, directory in staging.items():
                        os.replace(directory, directories[name])
        finally:
            remove_staging()
    except (export.ExportError, DataError, ValueError, OSError) as error:
        # ValueError: bad settings and the architecture mismatches (ArchitectureMismatch).
        _fail(str(error).replace('\n', ' '))
    print('\n'.join(_table(results)))
    if out is not None:
        print(f'wrote {out}' + ''.join(f' and {directory}/'
                                       for directory in directories.values()))


if __name__ == '__main__':
    command_line.run(main, names=('config', 'run_config'))
