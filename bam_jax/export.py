r"""Backbones to PyTorch/timm files, and PyTorch (official BAM) checkpoints back to JAX.

  python -m bam_jax.export --workdir DIR [--step N] [--weights teacher|student] \
    --out FILE [--format safetensors|pth] [--official] [--overwrite]

writes the backbone of a training checkpoint (the teacher by default, as the official
evaluation uses) as a timm state dict, a JSON of the `timm.create_model` arguments
beside it, and prints the lines that load it. `--official` also writes the official
BAM checkpoint layout (`student.module.backbone.*`, `teacher.backbone.*`) that the
official `eval_linear.py` and video-segmentation scripts load. `import_backbone` reads
such files, or a bare timm state dict, into JAX variables.

A fine-tuning workdir (`config.task='finetune'`) exports as timm's classifier: the
backbone and its `head` (`fc` for a ResNet), the JSON's `num_classes` the head's size,
loaded with strict=True; `import_backbone` reads such a file's backbone back.

torch runs only in a child process (`bam_jax.export_torch`): a process that imported
TensorFlow crashes when it then imports torch. Outputs are written to temporary files and
renamed when all are complete, so a failure leaves no partial file; an existing output is
replaced only with --overwrite. JAX, orbax and the models are imported by the functions
that use them, so --help and flag errors are instant.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

from bam_jax import command_line

FORMATS = {'.safetensors': 'safetensors', '.pth': 'pth', '.pt': 'pth'}
WEIGHTS = ('teacher', 'student')
# Where each network's backbone sits in an official BAM checkpoint's 'model' dict.
OFFICIAL_PREFIXES = {
    'teacher': ('teacher.backbone.', 'teacher.module.backbone.'),
    'student': ('student.module.backbone.', 'student.backbone.', 'module.backbone.',
                'backbone.'),
}


class ExportError(RuntimeError):
    """Bad input to an export or import; the message names the file, key or value."""


# ---------------------------------------------------------------------------
# A training workdir: DIR/config.json and orbax checkpoints in DIR/checkpoints.
# ---------------------------------------------------------------------------
def load_run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    if not workdir.is_dir():
        raise ExportError(f'workdir {workdir} does not exist')
    path = workdir / 'config.json'
    if not path.is_file():
        raise ExportError(f'{path} not found: is {workdir} a workdir written by train.py?')
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as error:
        raise ExportError(f'{path} is not valid JSON: {error}') from error


def restore_state(workdir: pathlib.Path, step: int | None = None):
    """(config, train state on one device, step) of a workdir's checkpoint.

    The abstract state comes from the config, laid out on this process's first device,
    so a checkpoint written on any number of devices restores here. If the checkpoint
    also saved its config, its `model` must equal config.json's.
    """
    import jax
    from jax.sharding import AxisType

    from bam_jax.models.timm_names import ArchitectureMismatch
    from bam_jax.train import checkpoint as checkpoint_lib
    from bam_jax.train import tasks

    workdir = pathlib.Path(workdir).absolute()  # orbax refuses relative paths
    config = load_run_config(workdir)
    directory = workdir / 'checkpoints'
    steps = []
    if directory.is_dir():  # (a Checkpointer would create it)
        listing = checkpoint_lib.Checkpointer(directory)
        steps = listing.all_steps()
        listing.close()
    if not steps:
        raise ExportError(f'no checkpoint in {directory}')
    step = max(steps) if step is None else step
    if step not in steps:
        raise ExportError(f'no checkpoint for step {step} in {directory}; '
                          f'available steps: {steps}')
    json_items = ('config',) if (directory / str(step) / 'config').is_dir() else ()
    mesh = jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:1])
    try:
        abstract = tasks.abstract_state(config, mesh)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ExportError(f'cannot build the model of {workdir / "config.json"}: '
                          f'{error}') from error
    _check_saved_shapes(abstract, directory / str(step), workdir / 'config.json')
    checkpointer = checkpoint_lib.Checkpointer(directory, json_items=json_items)
    try:
        state, items = checkpointer.restore(checkpoint_lib.abstract_like(abstract, mesh),
                                            step)
    except Exception as error:  # tensorstore reports unreadable data as a bare Exception
        checkpoint_lib.quiet_failed_restore()
        raise ExportError(f'checkpoint {directory / str(step)} is corrupt or unreadable: '
                          f'{checkpoint_lib.root_cause(error)}') from error
    finally:
        checkpointer.close()
    saved_config = items.get('config')
    if isinstance(saved_config, str):  # saved as `config.to_json_best_effort()`
        saved_config = json.loads(saved_config)
    saved_model = saved_config.get('model') if isinstance(saved_config, dict) else None
    if saved_model is not None and saved_model != config.model.to_dict():
        raise ArchitectureMismatch(
            f'{workdir / "config.json"} says model {config.model.to_dict()}, but '
            f'checkpoint step {step} was saved with model {saved_model}')
    return config, state, step


def _dotted(path) -> str:
    """A key path as orbax names the arrays of a saved tree: 'params.backbone.norm.bias'."""
    return '.'.join(str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
                    for key in path)


def _check_saved_shapes(abstract_state, step_directory: pathlib.Path,
                        config_path: pathlib.Path):
    """Compares the checkpoint's array metadata with the config's state before reading.

    A mismatch found by orbax mid-restore leaves its reader threads failing noisily;
    this check names the first differing array instead (backbone params first).
    """
    import jax
    import orbax.checkpoint as ocp

    from bam_jax.models.timm_names import ArchitectureMismatch
    from bam_jax.train import checkpoint as checkpoint_lib
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(
            step_directory / checkpoint_lib.STATE)
    except Exception as error:  # missing or garbled metadata files
        raise ExportError(f'checkpoint {step_directory} is corrupt or unreadable: '
                          f'{checkpoint_lib.root_cause(error)}') from error
    saved = {leaf.name: tuple(getattr(leaf, 'shape', ()))
             for leaf in jax.tree.leaves(metadata)}
    wanted = {_dotted(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
    differing = sorted((name for name in saved.keys() | wanted.keys()
                        if saved.get(name) != wanted.get(name)),
                       key=lambda name: (not name.startswith('params.backbone.'), name))
    if differing:
        name = differing[0]
        raise ArchitectureMismatch(
            f'checkpoint {step_directory} does not match the model of {config_path}: '
            f'{name} has shape {saved.get(name, "(absent)")} in the checkpoint but '
            f'{wanted.get(name, "(absent)")} for the config '
            f'({len(differing)} arrays differ)')


def backbone_variables(state, weights: str) -> dict[str, Any]:
    """The backbone's {'params'[, 'batch_stats']} of the student or the EMA teacher."""
    from bam_jax.train import state as state_lib
    try:
        return state_lib.backbone_variables(state, weights)
    except ValueError as error:
        raise ExportError(f'{error}; use --weights student') from error


# ---------------------------------------------------------------------------
# The timm model and the lines that load a file into it.
# ---------------------------------------------------------------------------
def timm_spec(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The spec (`timm_names`) of the timm model equal to `config.model`'s, as the JSON
    beside an export holds it (tuples become lists), so the two compare equal."""
    from bam_jax.models.timm_names import timm_backbone
    spec = timm_backbone(model_config['name']).model_spec(model_config)
    return json.loads(json.dumps(spec))


def load_lines(spec: Mapping[str, Any], path: pathlib.Path, file_format: str) -> list[str]:
    """Python lines that build the timm model and load `path` into it, strictly."""
    from bam_jax.models.timm_names import create_model_line
    if file_format == 'safetensors':
        head = ['import timm', 'from safetensors.torch import load_file']
        read = f'load_file({str(path)!r})'
    else:
        head = ['import timm', 'import torch']
        read = f"torch.load({str(path)!r}, map_location='cpu', weights_only=True)"
    return head + [create_model_line(spec), f'model.load_state_dict({read}, strict=True)']


# ---------------------------------------------------------------------------
# Files: all-or-nothing writes; torch only in a child process.
# ---------------------------------------------------------------------------
def write_all(writers: Mapping[pathlib.Path, Callable[[pathlib.Path], None]]):
    """Runs each writer on a temporary path beside its target, then renames them all."""
    temporary = {}
    try:
        for path, write in writers.items():
            if not path.parent.is_dir():
                raise ExportError(f'output directory {path.parent} does not exist')
            if path.is_dir():
                raise ExportError(f'output {path} is a directory')
            temporary[path] = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
            write(temporary[path])
        for path, temporary_path in temporary.items():
            os.replace(temporary_path, path)
    finally:
        for temporary_path in temporary.values():
            temporary_path.unlink(missing_ok=True)


def _run_torch(*arguments: str) -> str:
    """`python -m bam_jax.export_torch ARGUMENTS` in a child process; its stdout."""
    root = str(pathlib.Path(__file__).resolve().parents[1])  # where bam_jax is
    path = os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
    result = subprocess.run([sys.executable, '-m', 'bam_jax.export_torch', *arguments],
                            capture_output=True, text=True, check=False,
                            env=dict(os.environ, PYTHONPATH=path))
    if result.returncode:
        lines = result.stderr.strip().splitlines() or ['(no message)']
        if 'No module named' in lines[-1]:
            raise ExportError(f'.pth files need torch and safetensors: {lines[-1]}')
        raise ExportError(lines[-1])
    return result.stdout


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: pathlib.Path,
                    file_format: str, *, wrap_in_model: bool = False):
    """A NumPy state dict as safetensors, or as a torch .pth (via a child process)."""
    from safetensors.numpy import save, save_file
    arrays = {key: np.ascontiguousarray(value) for key, value in state_dict.items()}
    if file_format == 'safetensors':
        # `save` + write_bytes rather than `save_file`, which creates the file mode 0600.
        path.write_bytes(save(arrays, metadata={'format': 'pt'}))
        return
    with tempfile.TemporaryDirectory() as scratch:
        tensors = pathlib.Path(scratch) / 'tensors.safetensors'
        save_file(arrays, str(tensors))
        _run_torch('save', str(tensors), str(path), 'wrap' if wrap_in_model else 'bare')


def read_state_dict(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors as NumPy, {'args': official run args or None}) of a .safetensors/.pth."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    if not path.is_file():
        raise ExportError(f'{path} does not exist')
    if path.suffix == '.safetensors':
        try:
            return load_file(str(path)), {'args': None}
        except (SafetensorError, OSError) as error:
            raise ExportError(f'{path} is not a readable safetensors file: '
                              f'{error}') from error
    with tempfile.TemporaryDirectory() as scratch:
        tensors = pathlib.Path(scratch) / 'tensors.safetensors'
        info = json.loads(_run_torch('load', str(path), str(tensors)))
        return load_file(str(tensors)), info


# ---------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------
def output_paths(out: pathlib.Path, file_format: str | None, official: bool,
                 overwrite: bool = False) -> tuple[str, dict[str, pathlib.Path]]:
    """The format and the paths of the state dict, its JSON and the official file;
    an existing one is refused unless `overwrite`."""
    suffix_format = FORMATS.get(out.suffix)
    if file_format is None:
        file_format = suffix_format or 'safetensors'
    elif suffix_format not in (None, file_format):
        raise ExportError(f'--out {out} has a {out.suffix} suffix but --format is '
                          f'{file_format}')
    paths = {'state_dict': out, 'json': out.with_suffix('.json')}
    if official:
        paths['official'] = out.with_name(out.stem + '.official.pth')
    if len(set(paths.values())) < len(paths):
        raise ExportError(f'--out {out} would collide with its own JSON or official file')
    existing = [path for path in paths.values() if path.is_file()]
    if existing and not overwrite:
        raise ExportError(f'{existing[0]} exists; pass --overwrite to replace it, or '
                          'choose another --out')
    return file_format, paths


def official_networks(state) -> dict[str, dict[str, Any]]:
    """Each network's backbone by its key prefix in an official checkpoint's 'model'.

    With a teacher: `student.module.backbone.` and `teacher.backbone.`; without, the
    DDP-wrapped student `module.backbone.`.
    """
    if state.teacher_params is None:
        return {'module.backbone.': backbone_variables(state, 'student')}
    return {OFFICIAL_PREFIXES[network][0]: backbone_variables(state, network)
            for network in WEIGHTS}


def export_backbone(variables: Mapping[str, Any], model_config: Mapping[str, Any],
                    out: str | pathlib.Path, *, file_format: str | None = None,
                    official: Mapping[str, Mapping[str, Any]] | None = None,
                    info: Mapping[str, Any] | None = None,
                    overwrite: bool = False,
                    head: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes backbone variables as a timm state dict plus its JSON; returns the JSON.

    Args:
      variables: the backbone's {'params'[, 'batch_stats']}.
      model_config: `config.model` of the run (as a dict).
      out: the state dict's path; the JSON goes beside it with a .json suffix.
      file_format: 'safetensors' or 'pth'; default from the suffix of `out`.
      official: if given, {key prefix: variables} also written as OUT_STEM.official.pth
        in the official BAM checkpoint layout `{'model': {prefix + timm key: tensor}}`.
      info: extra entries for the JSON (step, weights, workdir).
      overwrite: replace existing files (else an ExportError names the first).
      head: a fine-tuned classifier's linear head ({'kernel' [D, N], 'bias' [N]}): the
        file is then timm's classifier, `create_model(..., num_classes=N)`.
    """
    from bam_jax.models.timm_names import timm_backbone
    out = pathlib.Path(out).absolute()
    file_format, paths = output_paths(out, file_format, official is not None, overwrite)
    entry = timm_backbone(model_config['name'])
    spec = timm_spec(model_config)
    state_dict = entry.to_timm(variables)
    if head is not None:
        prefix = classifier_prefix(model_config['name'])
        state_dict[f'{prefix}weight'] = np.ascontiguousarray(np.asarray(head['kernel']).T)
        state_dict[f'{prefix}bias'] = np.asarray(head['bias'])
        spec['model_kwargs']['num_classes'] = int(np.shape(head['bias'])[0])
    summary = {**spec, 'file': str(paths['state_dict']), 'format': file_format,
               **(info or {}), 'load': load_lines(spec, paths['state_dict'], file_format)}
    writers = {paths['state_dict']: lambda path: save_state_dict(state_dict, path,
                                                                 file_format)}
    if official is not None:
        official_keys = {prefix + key: value
                         for prefix, network in official.items()
                         for key, value in entry.to_timm(network).items()}
        summary['official_file'] = str(paths['official'])
        writers[paths['official']] = lambda path: save_state_dict(
            official_keys, path, 'pth', wrap_in_model=True)
    writers[paths['json']] = lambda path: path.write_text(
        json.dumps(summary, indent=2) + '\n')
    write_all(writers)
    return summary


def export_workdir(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                   step: int | None = None, weights: str | None = None,
                   file_format: str | None = None,
                   official: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Writes a checkpoint's backbone for timm (see `export_backbone`).

    `weights` defaults to the teacher when the run has one; `step` to the latest.
    """
    workdir = pathlib.Path(workdir)
    # Bad flags and existing outputs fail before the checkpoint is read.
    output_paths(pathlib.Path(out).absolute(), file_format, official, overwrite)
    if weights not in (None, *WEIGHTS):
        raise ExportError(f'weights must be one of {WEIGHTS}, got {weights!r}')
    config, state, step = restore_state(workdir, step)
    if config.get('task', 'pretrain') == 'finetune':
        if official:
            raise ExportError('--official writes a pretraining checkpoint; '
                              f'{workdir} is a fine-tuning run')
        if weights == 'teacher':
            raise ExportError(f'{workdir} is a fine-tuning run: it has no teacher')
        return export_backbone(
            backbone_variables(state, 'student'), config.model.to_dict(), out,
            file_format=file_format, head=jax_to_numpy(state.params['head']),
            info={'weights': 'classifier', 'step': int(step),
                  'workdir': str(workdir.absolute()),
                  'run_config': json.loads(config.to_json_best_effort())},
            overwrite=overwrite)
    if weights is None:
        weights = 'teacher' if state.teacher_params is not None else 'student'
    return export_backbone(
        backbone_variables(state, weights), config.model.to_dict(), out,
        file_format=file_format, official=official_networks(state) if official else None,
        info={'weights': weights, 'step': int(step), 'workdir': str(workdir.absolute()),
              'run_config': json.loads(config.to_json_best_effort())},
        overwrite=overwrite)


# timm's name of the classifier layer of each backbone family that has one here.
CLASSIFIER_PREFIXES = {'vit': 'head.', 'resnet50': 'fc.'}


def classifier_prefix(name: str) -> str:
    """timm's key prefix of a family's linear classifier ('head.' for a ViT)."""
    if name not in CLASSIFIER_PREFIXES:
        raise ExportError(f'exporting a fine-tuned {name} classifier to timm is not '
                          f'supported (only {sorted(CLASSIFIER_PREFIXES)}); its backbone '
                          'alone is: python -m bam_jax.export --weights student')
    return CLASSIFIER_PREFIXES[name]


def jax_to_numpy(tree):
    import jax
    return jax.tree.map(np.asarray, jax.device_get(tree))


# ---------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------
def select_backbone(state_dict: Mapping[str, np.ndarray], weights: str | None,
                    source: str) -> dict[str, np.ndarray]:
    """The bare backbone keys of one network in an official or timm state dict.

    Takes `teacher.backbone.*` or `student.module.backbone.*` (also `module.backbone.*`
    of runs without a teacher), drops heads and `_orig_mod.` (torch.compile), and
    passes a bare backbone through. `weights=None` prefers the teacher.
    """
    keys = {key.replace('_orig_mod.', ''): value for key, value in state_dict.items()}
    present = [network for network in WEIGHTS
               if any(key.startswith(OFFICIAL_PREFIXES[network]) for key in keys)]
    if not present:
        return keys  # a bare backbone
    if weights is None:
        weights = present[0]
    if weights not in present:
        raise ExportError(f'{source} has no {weights} backbone (it has: {present}); '
                          f'pass weights={present[0]!r}')
    selected = {}
    for key, value in keys.items():
        for prefix in OFFICIAL_PREFIXES[weights]:
            if key.startswith(prefix):
                selected[key[len(prefix):]] = value
                break
    return selected


def abstract_backbone(config) -> dict[str, Any]:
    """Shapes and dtypes of the backbone variables of a run config (pretraining or
    fine-tuning)."""
    import jax
    import jax.numpy as jnp

    from bam_jax.models.multicrop import build_backbone
    backbone = build_backbone(config)
    size = (config.crops.global_size if 'crops' in config else config.input.image_size)
    return jax.eval_shape(lambda: backbone.init(jax.random.key(0),
                                                jnp.zeros((1, size, size, 3))))


def _check_same_architecture(found: Mapping[str, Any], expected: Mapping[str, Any],
                             source: str):
    from bam_jax.models.timm_names import ArchitectureMismatch
    differing = {key: (found[key], value) for key, value in expected.items()
                 if key in found and found[key] != value}
    if differing:
        shown = ', '.join(f'{key}={got!r} (requested {want!r})'
                          for key, (got, want) in differing.items())
        raise ArchitectureMismatch(f'{source} is for another architecture: {shown}')


def sidecar_run_config(path: pathlib.Path):
    """The run config kept in the JSON beside an exported file, or None (an official
    checkpoint, a timm file, or an export older than the key)."""
    from bam_jax import command_line
    sidecar = path.with_suffix('.json')
    try:
        tree = json.loads(sidecar.read_text()).get('run_config')
    except (OSError, ValueError, AttributeError):
        return None
    return None if tree is None else command_line.config_from_json(tree)


def import_backbone(path: str | pathlib.Path, config,
                    weights: str | None = None) -> dict[str, Any]:
    """Backbone variables (NumPy) for `config`'s model from a PyTorch file.

    Reads an official BAM checkpoint (`{'model': ...}` with `teacher.backbone.*` /
    `student.module.backbone.*`), a file written by `export_workdir`, or a bare timm
    state dict, as .pth or .safetensors. Shapes are checked strictly; so are the
    architecture arguments the file records (official `args.arch` / `patch_size`, or
    the timm arguments in the JSON beside an exported file), which catches what shapes
    cannot, such as the head count.
    """
    from bam_jax.models.timm_names import timm_backbone
    path = pathlib.Path(path)
    entry = timm_backbone(config.model.name)
    spec = timm_spec(config.model.to_dict())
    state_dict, info = read_state_dict(path)
    if info['args'] is not None and entry.official_args is not None:
        _check_same_architecture(info['args'], entry.official_args(config.model.to_dict()),
                                 f'{path} (its args)')
    sidecar = path.with_suffix('.json')
    classes = 0
    if sidecar.is_file():
        recorded = json.loads(sidecar.read_text())
        if 'model_kwargs' in recorded:
            kwargs = dict(recorded['model_kwargs'])
            classes = kwargs.pop('num_classes', 0) or 0  # a classifier's backbone is one
            _check_same_architecture(kwargs, spec['model_kwargs'],
                                     f'{path} (per {sidecar.name})')
    backbone = select_backbone(state_dict, weights, str(path))
    if classes:  # a fine-tuned classifier: its backbone without the head
        prefix = CLASSIFIER_PREFIXES.get(config.model.name, 'head.')
        backbone = {key: value for key, value in backbone.items()
                    if not key.startswith(prefix)}
    return entry.from_timm(backbone, abstract_backbone(config), source=str(path))


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = command_line.argument_parser('python -m bam_jax.export', __doc__)
    parser.add_argument('--workdir', required=True, type=pathlib.Path,
                        help='a training workdir (train.py --workdir)')
    parser.add_argument('--step', type=int, help='default: the latest checkpoint')
    parser.add_argument('--weights', choices=WEIGHTS,
                        help='default: the teacher if the run has one')
    parser.add_argument('--out', required=True, type=pathlib.Path,
                        help='the state dict file (.safetensors or .pth); its JSON goes '
                        'beside it')
    parser.add_argument('--format', choices=sorted(set(FORMATS.values())),
                        help='default: from the --out suffix, else safetensors')
    parser.add_argument('--official', action='store_true',
                        help='also write OUT_STEM.official.pth in the official BAM layout')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace existing output files')
    args = parser.parse_args(argv)
    command_line.quiet_startup()
    command_line.skip_absent_tpu()
    try:
        summary = export_workdir(args.workdir, args.out, step=args.step,
                                 weights=args.weights, file_format=args.format,
                                 official=args.official, overwrite=args.overwrite)
    except (ExportError, ValueError, OSError) as error:  # ValueError: bad config values
        print(f'error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return command_line.interrupted('nothing was written')
    what = (f'classifier ({summary["model_kwargs"]["num_classes"]} classes)'
            if summary['weights'] == 'classifier' else f'{summary["weights"]} backbone')
    print(f'wrote {summary["file"]}: {what} of step '
          f'{summary["step"]} ({summary["model_name"] or summary["model_class"]})')
    print(f'wrote {pathlib.Path(summary["file"]).with_suffix(".json")}')
    if 'official_file' in summary:
        print(f'wrote {summary["official_file"]} (official BAM layout)')
    print('load it with:')
    for line in summary['load']:
        print(f'  {line}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
