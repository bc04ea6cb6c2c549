"""`benchmarks/memory_plan.py` on simulated CPU devices: per-chip costs and the roofline."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, data_mesh, environment

_spec = importlib.util.spec_from_file_location('memory_plan',
                                               REPO / 'benchmarks' / 'memory_plan.py')
memory_plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_plan)


def tiny_config(task: str):
    """The task's ViT-S paper config, shrunk: 16 images of 32 px (pretraining: 2×32 +
    2×16 crops; fine-tuning: 10 classes), one narrow block."""
    config = memory_plan.variant_config('vit_small', remat=False, shard_state=False,
                                        task=task)
    config.batch_size = 16
    config.model.update(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    if task == 'finetune':
        config.input.image_size, config.num_classes = 32, 10
        return config
    config.projector.update(hidden_dim=64, out_dim=32)
    config.crops.update(global_size=32, local_size=16, n_local=2)
    config.loss.top_k = 8
    return config


@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
def test_plan_is_per_chip_and_its_roofline(task):
    from bam_jax.train.tasks import abstract_training

    config, mesh = tiny_config(task), data_mesh(8)
    chip = memory_plan.Chip('none', hbm_gib=1.0, peak_flops=1e9, hbm_bytes_per_s=1e8)
    row = memory_plan.plan(config, mesh, chip, images_per_core=10.0)
    # The whole step's FLOPs before XLA splits it over the devices (lowered, not compiled).
    training = abstract_training(config, mesh, 100)
    whole = training.train_step.lower(
        training.state, memory_plan.abstract_batch(config, mesh)).cost_analysis()['flops']
    # The compiled cost is one device's program: 8 of them make the whole step (and a
    # little more: the loss's gathered columns, the replicated optimizer update; and the
    # lowered count has fine-tuning's shard_map, erasing and mixup, at one device's shapes).
    assert row['task'] == task
    assert row['images_per_chip'] == 2
    assert row['flops_total'] == 8 * row['flops_per_chip']
    assert 1.0 < row['flops_total'] / whole < 1.4
    step = max(row['flops_per_chip'] / 1e9, row['bytes_per_chip'] / 1e8)
    assert row['roofline_step_s'] == pytest.approx(step, rel=1e-12)
    assert row['bound'] == ('compute' if step == row['flops_per_chip'] / 1e9 else 'HBM')
    assert row['images_per_s_per_chip'] == pytest.approx(2 / step, rel=1e-12)
    assert row['chips_per_host'] == 8  # the simulated devices are all one process's
    assert row['host_cores_needed'] == pytest.approx(8 * 2 / step / 10.0, rel=1e-12)
    assert row['compute_dtype'] == 'float32'  # 'auto' on the CPU


def test_finetune_host_cores_need_a_measured_pipeline():
    """Fine-tuning's host pipeline is not measured: no host cores unless given."""
    chip = memory_plan.Chip('none', hbm_gib=1.0, peak_flops=1e9, hbm_bytes_per_s=1e8)
    rates = memory_plan.roofline(1e9, 1e8, 2, chip, 4,
                                 memory_plan.IMAGES_PER_CORE['finetune'])
    assert rates['host_cores_needed'] is None
    assert rates['images_per_s_per_host'] == pytest.approx(8.0)


def test_the_documented_finetune_command_plans_the_paper_batch():
    """docs/performance.md's `memory_plan.py --task finetune`, compiled for 8 CPU devices
    instead of a TPU (no libtpu in the tests): ViT-S/16 at DeiT's batch of 1024, 128 images
    a device, about 28 GFLOP an image by XLA's count (the analytic figure is 27.6)."""
    result = subprocess.run(
        [sys.executable, 'benchmarks/memory_plan.py', '--task', 'finetune', '--platform',
         'cpu', '--devices', '8', '--variants', 'vit_small', '--topologies', 'v5e-64',
         '--layouts', 'replicated', '--remat', 'no'],
        cwd=REPO, env=environment(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(result.stdout.strip().splitlines()[-1])['rows']
    assert (row['task'], row['variant'], row['images_per_chip']) == ('finetune', 'vit_small',
                                                                    128)
    assert 26e9 < row['flops_total'] / 1024 < 30e9
