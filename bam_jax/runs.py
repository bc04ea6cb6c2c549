r"""What a workdir holds: the run, its checkpoints (each read back), its last numbers.

  python -m bam_jax.runs WORKDIR [--no_check]

For a run on a shared cluster, before resuming, evaluating or deleting it: the model and
data it trains, whether it finished, every checkpoint step and whether it restores (each
is read in full on one CPU device, as `python -m bam_jax.export` would read it;
`--no_check` only lists them), what was set aside (`corrupt/`, `replaced/`), the last
logged scalars and the last kNN. It writes nothing. A path that is not a workdir is one
`error:` line and exit status 1.
"""

from __future__ import annotations

import math
import pathlib
import sys

from bam_jax import command_line

_SHOWN = ('loss', 'learning_rate', 'teacher_momentum', 'grad_norm', 'images_per_sec')


def _run_line(config) -> str:
    model = config.model
    sizes = {'vit': ('embed_dim', 'depth', 'num_heads', 'patch_size', 'img_size'),
             'resnet50': ('stage_depths', 'width'),
             'caformer_m36': ('depths', 'dims')}.get(model.name, ())
    shape = ', '.join(f'{key} {model[key]}' for key in sizes if key in model)
    data = config.data
    where = f' in {data.data_dir}' if data.get('data_dir') else ''
    name = f' {data.name}' if data.source == 'tfds' else ''
    return (f'{model.name} ({shape}) on {data.source}{name} {data.split!r}{where}; batch '
            f'{config.batch_size}, {config.epochs} epochs, seed {config.seed}')


def _total_steps(config) -> int | None:
    """The run's length in steps, if its data can be reached from here."""
    from bam_jax.data import sources
    try:
        return config.epochs * (len(sources.make_source(config.data)) // config.batch_size)
    except (sources.DataError, OSError, ValueError):
        return None


def describe(workdir: pathlib.Path, *, check: bool = True) -> list[str]:
    """The report's lines (see the module docstring)."""
    from bam_jax import export
    from bam_jax.train import metrics_log

    config = export.load_run_config(workdir)
    lines = [f'{workdir}: {_run_line(config)}']
    directory = workdir / 'checkpoints'
    steps = sorted(int(path.name) for path in directory.iterdir()
                   if path.name.isdigit()) if directory.is_dir() else []
    intact = []
    for step in steps:
        if not check:
            continue
        try:
            export.restore_state(workdir, step)
            intact.append(step)
        except (export.ExportError, ValueError) as error:
            lines.append(f'  step {step}: does not restore ({str(error)[:200]})')
    total = _total_steps(config)
    newest = max(intact if check else steps, default=None)
    if newest is None:
        status = 'no checkpoint' + (' restores' if steps else ' yet')
    elif total is None:
        status = f'at step {newest} (its data is not reachable here, so its length is unknown)'
    elif newest >= total:
        status = f'finished: step {newest} of {total}'
    else:
        status = (f'unfinished: step {newest} of {total} ({100 * newest / total:.0f} %); '
                  'train.py with the same flags resumes it')
    lines.append(f'  {status}')
    if steps:
        shown = [f'{step}' + ('' if not check else ' intact' if step in intact
                              else ' BROKEN') for step in steps]
        lines.append(f'  checkpoints: {", ".join(shown)}' + ('' if check else ' (not read)'))
    for aside in ('corrupt', 'replaced'):
        entries = sorted(path.name for path in (workdir / aside).glob('*'))
        if entries:
            lines.append(f'  {aside}/: {", ".join(entries)}')
    if (workdir / 'metrics.jsonl').is_file():
        metrics = metrics_log.read_metrics(workdir)
        logged = [step for step, scalars in metrics.items() if 'loss' in scalars]
        if logged:
            step = max(logged)
            scalars = ', '.join(f'{name} {metrics[step][name]:.4g}' for name in _SHOWN
                                if name in metrics[step]
                                and math.isfinite(metrics[step][name]))
            lines.append(f'  last logged (step {step}): {scalars}')
        # The task's evaluation: pretraining's online kNN, fine-tuning's top-1 / top-5.
        for prefix, title in (('knn/', 'kNN'), ('eval/', 'evaluation')):
            evaluated = [step for step, scalars in metrics.items()
                         if any(name.startswith(prefix) for name in scalars)]
            if evaluated:
                step = max(evaluated)
                values = ', '.join(f'{name[len(prefix):]} {value:.1f} %'
                                   for name, value in sorted(metrics[step].items())
                                   if name.startswith(prefix))
                lines.append(f'  last {title} (step {step}): {values}')
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = command_line.argument_parser('python -m bam_jax.runs', __doc__)
    parser.add_argument('workdir', type=pathlib.Path, help='a train.py --workdir')
    parser.add_argument('--no_check', action='store_true',
                        help='list the checkpoints without reading them')
    args = parser.parse_args(argv)
    command_line.quiet_startup()
    command_line.skip_absent_tpu()
    from bam_jax import export
    try:
        print('\n'.join(describe(args.workdir.absolute(), check=not args.no_check)))
    except export.ExportError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return command_line.interrupted('nothing was written')
    return 0


if __name__ == '__main__':
    sys.exit(main())
