"""A pod-shaped run: 2 processes × 2 devices on 127.0.0.1, the ViT-S config by flags only.

`configs/vit_small_imagenet.py` is launched as on a pod (every process the same command,
`--coordinator_address`), shrunk by command-line keys only, on the generated ImageNet-
shaped TFDS ArrayRecord data set, with ContrastiveCrop and the online kNN on. Both
processes get SIGTERM mid-run, after a kNN, save the same step and exit 143, the log
quoting that kNN at the step it was made; the same commands resume and finish; the
result is exported to timm's layout and evaluated.
"""

import json
import pathlib
import signal
import subprocess
import sys
import time

from bam_jax.train import metrics_log
from bam_jax.train.checkpoint import Checkpointer
from conftest import REPO, environment
from test_documented_commands import SHRINK_MODEL, _CROPS
from test_run import free_port

EPOCHS = 4  # of 8 steps; the kNN every 2


def pod_command(workdir, data_dir, port, index):
    return [sys.executable, str(REPO / 'train.py'),
            '--config=configs/vit_small_imagenet.py', f'--workdir={workdir}',
            f'--config.data.data_dir={data_dir}', *_CROPS, *SHRINK_MODEL['vit'],
            f'--config.epochs={EPOCHS}', '--config.data.ccrop_warmup_epochs=0',
            '--config.data.ccrop_loc_interval=1', '--config.knn.every_epochs=2',
            '--config.checkpoint_every_steps=4',
            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
            f'--process_id={index}']


def launch(workdir, data_dir):
    port = free_port()
    logs = [open(f'{workdir}.{index}.log', 'a') for index in range(2)]
    return [subprocess.Popen(pod_command(workdir, data_dir, port, index),
                             env=environment(2), cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT) for index, log in enumerate(logs)]


def logged_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / 'metrics.jsonl'
    if not path.exists():
        return []
    return sorted(step for step, scalars in metrics_log.read_metrics(workdir).items()
                  if 'loss' in scalars)


def test_pod_run_preempted_resumed_exported_and_evaluated(tmp_path, tfds_imagenet_dir):
    workdir = tmp_path / 'pod'
    processes = launch(workdir, tfds_imagenet_dir)
    deadline = time.time() + 600
    while max(logged_steps(workdir), default=0) < 17:  # into epoch 3, after the kNN
        assert all(process.poll() is None for process in processes), \
            pathlib.Path(f'{workdir}.0.log').read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    codes = [process.wait(timeout=300) for process in processes]
    logs = [pathlib.Path(f'{workdir}.{index}.log').read_text() for index in range(2)]
    assert codes == [128 + signal.SIGTERM] * 2, logs[0][-3000:]
    saved = {int(log.split('Stopped by SIGTERM: saved step ')[1].split(';')[0])
             for log in logs}
    assert len(saved) == 1  # both processes agreed on the step
    stopped_at, = saved
    steps_per_epoch = int(logs[0].split(' steps per epoch')[0].split()[-1])
    total = EPOCHS * steps_per_epoch
    assert 17 <= stopped_at < total
    # The last kNN is epoch 2's, quoted at its own step, not at the stop's.
    assert f'kNN (k=20) at step {2 * steps_per_epoch}: ' in logs[0]
    assert f'at step {stopped_at}: ' not in logs[0]
    assert stopped_at in Checkpointer(workdir / 'checkpoints').all_steps()

    processes = launch(workdir, tfds_imagenet_dir)
    codes = [process.wait(timeout=900) for process in processes]
    logs = [pathlib.Path(f'{workdir}.{index}.log').read_text() for index in range(2)]
    assert codes == [0, 0], logs[0][-3000:]
    assert f'Resumed from step {stopped_at}.' in logs[0]
    assert logged_steps(workdir) == list(range(1, total + 1))
    metrics = metrics_log.read_metrics(workdir)
    assert 0 <= metrics[total]['knn/teacher_top1'] <= 100  # the online kNN ran
    boxes = Checkpointer(workdir / 'checkpoints', array_items=('boxes',),
                         json_items=('data', 'config'))
    assert total in boxes.all_steps()

    out = tmp_path / 'backbone.safetensors'
    export = subprocess.run([sys.executable, '-m', 'bam_jax.export', f'--workdir={workdir}',
                             f'--out={out}'], cwd=REPO, env=environment(1),
                            capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    assert out.stat().st_size > 0
    report = tmp_path / 'eval.json'
    evaluate = subprocess.run(
        [sys.executable, '-m', 'bam_jax.evaluate', f'--workdir={workdir}',
         '--config.protocols=knn,linear', '--config.linear.epochs=1',
         '--config.linear.n_last_blocks=1', f'--out={report}'],
        cwd=REPO, env=environment(2), capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    results = json.loads(report.read_text())
    assert {'knn', 'linear'} <= set(results['results']), results['results']
