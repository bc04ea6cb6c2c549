r"""The official training step's work in PyTorch, timed on this machine: the reference
that `train_step.py --configs tiny` is compared with.

  python benchmarks/torch_step.py [--steps 5] [--threads 2]

Issue 15's tiny configuration, fp32, one process: a timm ViT (width 192, depth 6, 3 heads,
4 px patches, 32 px crops, positional embedding interpolated for the 16 px ones) with the
3-layer 1024-wide GELU projector, student and EMA teacher; 64 images in 2 × 32 px + 4 ×
16 px pre-augmented crops, each resolution one forward as the official multi-crop wrapper
runs them. Then the official `DistillBAMLoss` (docs: ../shared/docs/bam_reference.md, §1):
L2-normalised rows, the teacher's global crops as the 128 columns, the positive mask,
3 Sinkhorn sweeps at ε 0.05 on the teacher's similarities without gradient, softmax at τ
0.1, cross-entropy over every (target, source) pair but local-local; backward, gradient
clipping at 0.3, AdamW, and the teacher's EMA. Same FLOPs as the JAX step.

Runs in its own process and never imports JAX or TensorFlow (TensorFlow before torch
crashes). Prints a table and one JSON line.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import _peak  # noqa: E402  (NumPy only)
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IMAGES, N_GLOBAL, N_LOCAL, GLOBAL_SIZE, LOCAL_SIZE = 64, 2, 4, 32, 16
TEMPERATURE, EPSILON, SINKHORN_SWEEPS, CLIP, MOMENTUM = 0.1, 0.05, 3, 0.3, 0.995


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.models.vision_transformer.VisionTransformer(
            img_size=GLOBAL_SIZE, patch_size=4, embed_dim=192, depth=6, num_heads=3,
            num_classes=0, dynamic_img_size=True)
        self.projector = nn.Sequential(nn.Linear(192, 1024), nn.GELU(), nn.Linear(1024, 1024),
                                       nn.GELU(), nn.Linear(1024, 1024))

    def forward(self, crops_by_size):
        # One backbone pass per crop resolution, then one projector pass over all crops.
        features = torch.cat([self.backbone(crops) for crops in crops_by_size])
        return F.normalize(self.projector(features), dim=-1)


def bam_loss(z_student, z_teacher):
    """The official distillation loss on one process; rows are crop-major."""
    n_crops, b = N_GLOBAL + N_LOCAL, IMAGES
    columns = z_teacher[:N_GLOBAL * b]
    image = torch.arange(b).repeat(n_crops)
    positive = image[:, None] == torch.arange(b).repeat(N_GLOBAL)[None, :]
    with torch.no_grad():
        logits = (z_teacher @ columns.T / EPSILON).masked_fill(positive, torch.finfo().min)
        plan = torch.exp(logits - logits.max())
        for _ in range(SINKHORN_SWEEPS):
            plan = plan / plan.sum(dim=0, keepdim=True)
            plan = plan / plan.sum(dim=1, keepdim=True)
        targets = plan[:N_GLOBAL * b].view(N_GLOBAL, b, -1)
    log_q = F.log_softmax((z_student @ columns.T / TEMPERATURE).masked_fill(
        positive, torch.finfo().min), dim=-1).view(n_crops, b, -1)
    keep = (~positive[:b]).float()
    loss = 0.0
    for target_view in range(N_GLOBAL):
        pairs = [-(targets[target_view] * log_q[source] * keep).sum(-1).mean()
                 for source in range(n_crops) if source != target_view]
        loss = loss + sum(pairs) / (n_crops - 1)
    return loss / N_GLOBAL


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    student = Student()
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04)
    crops = [torch.randn(N_GLOBAL * IMAGES, 3, GLOBAL_SIZE, GLOBAL_SIZE),
             torch.randn(N_LOCAL * IMAGES, 3, LOCAL_SIZE, LOCAL_SIZE)]

    def step():
        with torch.no_grad():
            z_teacher = teacher(crops)
        loss = bam_loss(student(crops), z_teacher)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        optimizer.step()
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(MOMENTUM).add_(s.detach(), alpha=1 - MOMENTUM)
        return float(loss.detach())

    for _ in range(2):
        step()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak_gib = _peak.process_peak_rss_gib()
    result = dict(images=IMAGES, threads=args.threads, torch=torch.__version__,
                  step_seconds_best=min(seconds), step_seconds_median=statistics.median(seconds),
                  peak_rss_gib=peak_gib, load_average=os.getloadavg()[0])
    print(f"{'config':<8} {'images':>6} {'best s':>7} {'median s':>8} {'peak RSS GiB':>12}")
    print(f"{'tiny':<8} {IMAGES:>6} {result['step_seconds_best']:7.2f} "
          f"{result['step_seconds_median']:8.2f} {peak_gib:12.2f}")
    print(json.dumps({'benchmark': 'torch_step', 'results': [result]}))


if __name__ == '__main__':
    main()
