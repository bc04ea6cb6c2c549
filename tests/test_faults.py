"""A soak of faults: one folder run, with grain worker processes, hit again and again.

SIGTERM (preemption), a Ctrl-C to the whole process group (as a terminal sends it),
`kill -9`, and `kill -9` with the newest checkpoint then cut short, at steps drawn from a
seeded generator; each time the run is started again. It must end with the parameters
and the losses of the same run left alone, and after every fault no process it started
(grain workers, multiprocessing's resource tracker) and no shared-memory segment of its
batches may outlive it by more than 10 s. The Ctrl-C must print one line, not the
workers' tracebacks.
"""

import os
import pathlib
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from bam_jax import export
from conftest import REPO, environment
from test_run import losses, truncate_newest_array_file, wait_for_step

# The ViT-S config shrunk (tests/test_documented_commands.py's sizes) on the labelled
# folder: 128 images, batch 16, 3 epochs of 8 steps, a checkpoint every 3 steps, 3 workers.
FOLDER_RUN = ('--config.data.source=folder', '--config.data.num_workers=3',
              '--config.crops.global_size=32', '--config.crops.local_size=16',
              '--config.crops.n_local=2', '--config.batch_size=16', '--config.epochs=3',
              '--config.projector.hidden_dim=64', '--config.projector.out_dim=32',
              '--config.data.ccrop_image_size=32', '--config.knn.every_epochs=0',
              '--config.loss.top_k=8', '--config.model.img_size=32',
              '--config.model.patch_size=8', '--config.model.embed_dim=32',
              '--config.model.depth=1', '--config.model.num_heads=2',
              '--config.checkpoint_every_steps=3', '--config.log_every_steps=1')
STEPS = 24
# Each fault is followed by a restart; the last restart runs to the end.
FAULTS = ('SIGTERM', 'SIGINT to the group', 'kill -9', 'kill -9, newest checkpoint cut short',
          'SIGINT to the group', 'kill -9')
ABSL_INFO = re.compile(r'^I\d{4} ')


def start(workdir, folder):
    log = open(f'{workdir}.log', 'a')
    return subprocess.Popen(
        [os.sys.executable, str(REPO / 'train.py'),
         f'--config={REPO}/configs/vit_small_imagenet.py', f'--workdir={workdir}',
         f'--config.data.data_dir={folder}', *FOLDER_RUN],
        env=environment(2), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group, as a terminal gives it


def descendants(pid: int) -> set[int]:
    parents = {}
    for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pids) -> set[int]:
    return {pid for pid in pids if pathlib.Path(f'/proc/{pid}').exists()
            and 'Z' not in pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1][:3]}


def shared_memory() -> set[str]:
    return set(os.listdir('/dev/shm'))


def final_parameters(workdir):
    _, state, step = export.restore_state(workdir)
    assert step == STEPS
    return jax.tree.leaves(jax.device_get((state.params, state.teacher_params)))


@pytest.fixture(scope='module')
def left_alone(image_folder_labelled, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('left_alone') / 'run'
    assert start(workdir, image_folder_labelled).wait(timeout=600) == 0
    return workdir


def test_a_run_hit_by_faults_ends_as_one_left_alone(image_folder_labelled, left_alone,
                                                    tmp_path):
    workdir, rng = tmp_path / 'run', np.random.default_rng(26)
    log = pathlib.Path(f'{workdir}.log')
    for fault in FAULTS:
        before_shm = shared_memory()
        process = start(workdir, image_folder_labelled)
        resumed_at = max(losses(workdir), default=0) if workdir.exists() else 0
        # 1 to 3 steps on, never near the end: 6 faults leave the run unfinished.
        wait_for_step(workdir, min(resumed_at + int(rng.integers(1, 4)), STEPS - 6), process)
        deadline = time.time() + 30  # the workers, between two iterators only briefly gone
        while len(children := descendants(process.pid)) < 3 and time.time() < deadline:
            assert process.poll() is None, fault
            time.sleep(0.05)
        assert len(children) >= 3, fault  # the workers (and the resource tracker)
        if fault == 'SIGTERM':
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 128 + signal.SIGTERM
        elif fault == 'SIGINT to the group':
            offset = log.stat().st_size
            os.killpg(process.pid, signal.SIGINT)
            assert process.wait(timeout=120) == 128 + signal.SIGINT
            said = [line for line in log.read_text()[offset:].splitlines()
                    if line.strip() and not ABSL_INFO.match(line)]
            assert len(said) == 1 and 'Stopped by SIGINT: saved step' in said[0], said
        else:
            process.kill()
            process.wait()
            if 'cut short' in fault:
                newest = max(int(path.name) for path in (workdir / 'checkpoints').iterdir()
                             if path.name.isdigit())
                truncate_newest_array_file(workdir / 'checkpoints' / str(newest))
        deadline = time.time() + 10
        while (alive(children) or shared_memory() - before_shm) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(children), (fault, alive(children))
        assert not shared_memory() - before_shm, fault
    assert start(workdir, image_folder_labelled).wait(timeout=600) == 0
    text = log.read_text()
    assert text.count('is corrupt or unreadable') == 1 and 'Traceback' not in text
    assert losses(workdir) == losses(left_alone)  # every step, exactly
    for resumed, expected in zip(final_parameters(workdir), final_parameters(left_alone),
                                 strict=True):
        np.testing.assert_array_equal(resumed, expected)
