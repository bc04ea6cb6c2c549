"""Test setup: 8 simulated CPU devices, set before JAX initialises.

Every multi-device path is tested on meshes built from subsets of these devices.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# XLA:CPU compiling for speed of compilation, in the tests and the runs they start: they
# compile hundreds of small programs and run each a few times. LLVM at -O0, in one piece
# (-45 % CPU on test_loss and test_train), and XLA's older elemental emitters instead of
# its MLIR fusion emitters, which compile each of a step's ~1,700 fusions as a module of
# its own (tiny CaFormer step: 14.3 → 5.8 s; ResNet 8.8 → 4.3; ViT 5.8 → 2.4), and the 62
# steps of the small run were no slower. A run that executes long passes `optimized=True`:
# the MNIST default's run is 50 % slower at -O0. The HLO is the same; float rounding
# differs in the last bits.
FAST_COMPILE = ('--xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1 '
                '--xla_cpu_use_fusion_emitters=false')
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8', FAST_COMPILE])
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Label files of the generated data sets go to a scratch directory, not ~/.cache.
os.environ.setdefault('BAM_JAX_LABEL_CACHE', tempfile.mkdtemp(prefix='bam_jax_labels_'))
# One XLA compilation cache for the session: a resumed run, the documented commands and
# tests that build the same step load the executable instead of compiling it again. Set
# here, in the process that starts the test workers, so they and their subprocesses share it.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='bam_jax_xla_'))
# Every program, not only those that took over a second: a run compiles dozens of small ones
# (orbax's slices of each parameter at the first save, eager ops) that the next run reuses.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402  (after the flags)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

pytest.register_assert_rewrite('user_data')  # imported here before it is a plugin
from user_data import built_once  # noqa: E402

assert jax.device_count() == 8, 'tests need 8 simulated devices; was JAX imported early?'

pytest_plugins = ('user_data',)  # generated data sets as users have them, for every module


def timm_child(script: str, jobs, arrays: dict, scratch: pathlib.Path
               ) -> tuple[dict, dict]:
    """Runs `script` (torch / timm code) in a child Python, which never imports
    TensorFlow (other tests may have imported it here, and torch after TensorFlow
    segfaults). The script gets the paths of `jobs` (JSON), `arrays` (npz) and its output
    `out.npz`; it writes that and `out.npz.json`, a report holding 'tensorflow_imported'.
    Returns (its arrays, its report)."""
    (scratch / 'jobs.json').write_text(json.dumps(jobs))
    np.savez(scratch / 'arrays.npz', **arrays)
    out = scratch / 'out.npz'
    result = subprocess.run([sys.executable, '-c', script, str(scratch / 'jobs.json'),
                             str(scratch / 'arrays.npz'), str(out)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.with_name(out.name + '.json').read_text())
    assert not report['tensorflow_imported']
    with np.load(out) as outputs:
        return dict(outputs), report


def data_mesh(n_devices: int) -> jax.sharding.Mesh:
    """A 1-D 'data' mesh over the first `n_devices` CPU devices."""
    return jax.make_mesh((n_devices,), ('data',), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n_devices])


@pytest.fixture(params=[1, 2, 4, 8], ids=lambda n: f'{n}dev')
def mesh(request):
    return data_mesh(request.param)


# ---------------------------------------------------------------- train.py runs
REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / 'tests' / 'run_configs' / 'tiny_mnist.py'
# A smaller network than the tiny MNIST run's (command-line overrides), without kNN.
SMALL = ('--config.model.embed_dim=32', '--config.model.depth=1', '--config.model.num_heads=2',
         '--config.projector.hidden_dim=64', '--config.projector.out_dim=32',
         '--config.crops.n_local=2', '--config.knn.every_epochs=0')


def command(workdir, *flags, config=TINY, python=()):
    """`python [python] train.py --config=config --workdir=workdir [flags]`."""
    return [sys.executable, *python, str(REPO / 'train.py'), f'--config={config}',
            f'--workdir={workdir}', *flags]


def environment(devices: int, optimized: bool = False) -> dict:
    """A subprocess's environment: `devices` CPU devices; LLVM -O0 unless `optimized`."""
    flags = f'--xla_force_host_platform_device_count={devices}'
    return dict(os.environ, JAX_PLATFORMS='cpu',
                XLA_FLAGS=flags if optimized else f'{flags} {FAST_COMPILE}')


def start(workdir, *flags, devices=4, small=True, python=()):
    """A background run logging to `workdir.log`: the small network (LLVM -O0), or with
    `small=False` the config's own (fully optimised: its steps dominate)."""
    log = open(f'{workdir}.log', 'a')
    flags = (*SMALL, *flags) if small else flags
    return subprocess.Popen(command(workdir, *flags, python=python),
                            env=environment(devices, optimized=not small), cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def finish(process, workdir, timeout=600) -> int:
    code = process.wait(timeout=timeout)
    print(pathlib.Path(f'{workdir}.log').read_text()[-3000:])
    return code


@pytest.fixture(scope='session')
def small_mnist_run(tmp_path_factory):
    """A real `train.py` run of the small network on MNIST: 2 epochs (62 steps) on 4
    devices, checkpoints every 10 steps (the last 3 kept: 50, 60, 62). Read-only; trained
    once for all test workers."""
    def train(directory):
        workdir = directory / 'run'
        assert finish(start(workdir), workdir) == 0
        return str(workdir)

    return pathlib.Path(built_once(tmp_path_factory, 'small_mnist', train))


# ---------------------------------------------------------------- bad-input cases
def corrupt_checkpoint(workdir, step: int):
    """Empties every array data file of a checkpoint step (orbax metadata intact)."""
    for data_file in (pathlib.Path(workdir) / 'checkpoints' / str(step) / 'state').rglob(
            'd/*'):
        data_file.write_bytes(b'')


def changed_copy(workdir, tmp_path, change=None) -> tuple[pathlib.Path, pathlib.Path]:
    """(a copy of `workdir` with `change(copy)` applied, an empty output directory)."""
    copy = tmp_path / 'run'
    shutil.copytree(workdir, copy)
    if change is not None:
        change(copy)
    out = tmp_path / 'out'
    out.mkdir()
    return copy, out
