"""`benchmarks/matmul_floor.py` finds every matrix product of the step it puts a floor under."""

import importlib.util
import sys

from conftest import REPO, data_mesh

sys.path.insert(0, str(REPO / 'benchmarks'))
_spec = importlib.util.spec_from_file_location('matmul_floor',
                                               REPO / 'benchmarks' / 'matmul_floor.py')
matmul_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matmul_floor)
import train_step  # noqa: E402  (benchmarks/)


def test_products_are_the_whole_steps_matmuls():
    from bam_jax.train import builder

    config = train_step.tiny_config()
    gemms = matmul_floor.step_gemms(config)
    found = sum(2 * batch * m * k * n * count for (batch, m, k, n), count in gemms.items())
    # The analytic count of `train_step.py`, less the frozen patch projection: a
    # convolution, not a dot_general (run by the student and the teacher, no backward).
    network = builder.build_training(config, data_mesh(1), 1000, abstract=True).network
    crops = config.crops
    patch_projection = sum(
        n_views * train_step.patch_embed_flops(network.backbone, size)
        for n_views, size in ((crops.n_global, crops.global_size),
                              (crops.n_local, crops.local_size)))
    expected = (train_step.step_flops_per_image(network, config)
                - 2 * patch_projection) * config.batch_size
    # Beyond it: 0.7 MFLOP (2e-6 of the step) of small products in the loss's
    # bookkeeping, e.g. `[6, 2] × [2, 8192]`, which the analytic count leaves out.
    assert 0 <= found - expected <= 1e-5 * expected
    # The MLP on the 2 global crops' 64 × 65 tokens, 6 blocks deep: fc1's forward in the
    # student and the teacher and fc2's input gradient are [8320, 192] × [192, 768]
    # (18); fc2's forward and fc1's input gradient the reverse (18).
    assert gemms[(1, 8320, 192, 768)] == gemms[(1, 8320, 768, 192)] == 18
