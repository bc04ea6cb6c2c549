r"""The BAM training step's work in PyTorch, timed on this machine: the baseline that
`train_step.py` compares each of its configs with, in the same run.

  python benchmarks/torch_step.py [--config tiny|vit_small|mnist] [--steps 5] [--threads 2]

The shapes are `step_configs.py`'s, as `train_step.py` times them, fp32, one process: a
timm ViT (the config's width, depth, heads and patches; the positional embedding
interpolated for the local crops) with the config's 3-layer GELU projector (BatchNorm
after its hidden layers where the config has it, as the official `--proj_use_bn`),
student and EMA teacher; the config's batch in pre-augmented global and local crops, each
resolution one forward as the official multi-crop wrapper runs them. Then the official
`DistillBAMLoss` (docs: ../shared/docs/bam_reference.md, §1): L2-normalised rows, the
teacher's global crops as the columns, the positive mask, 3 Sinkhorn sweeps at the
config's ε on the teacher's similarities without gradient, softmax at its τ,
cross-entropy over every (target, source) pair but local-local; backward, gradient
clipping, AdamW, and the teacher's EMA. Top-k is off in every config timed here. Same
FLOPs as the JAX step.

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
import step_configs  # noqa: E402  (no JAX)
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Student(nn.Module):
    def __init__(self, config):
        super().__init__()
        model, projector = config.model, config.projector
        self.backbone = timm.models.vision_transformer.VisionTransformer(
            img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
            depth=model.depth, num_heads=model.num_heads, num_classes=0,
            dynamic_img_size=True)
        widths = [model.embed_dim, projector.hidden_dim, projector.hidden_dim,
                  projector.out_dim]
        layers = []
        for index, (inputs, outputs) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(inputs, outputs))
            if index < 2:
                layers += ([nn.BatchNorm1d(outputs)] if projector.get('use_bn') else [])
                layers.append(nn.GELU())
        self.projector = nn.Sequential(*layers)

    def forward(self, crops_by_size):
        # One backbone pass per crop resolution, then one projector pass over all crops.
        features = torch.cat([self.backbone(crops) for crops in crops_by_size])
        return F.normalize(self.projector(features), dim=-1)


def bam_loss(z_student, z_teacher, config):
    """The official distillation loss on one process; rows are crop-major."""
    n_global, b = config.crops.n_global, config.batch_size
    n_crops = n_global + config.crops.n_local
    columns = z_teacher[:n_global * b]
    image = torch.arange(b).repeat(n_crops)
    positive = image[:, None] == torch.arange(b).repeat(n_global)[None, :]
    with torch.no_grad():
        logits = (z_teacher @ columns.T / config.loss.sinkhorn_reg).masked_fill(
            positive, torch.finfo().min)
        plan = torch.exp(logits - logits.max())
        for _ in range(config.loss.sinkhorn_iters):
            plan = plan / plan.sum(dim=0, keepdim=True)
            plan = plan / plan.sum(dim=1, keepdim=True)
        targets = plan[:n_global * b].view(n_global, b, -1)
    log_q = F.log_softmax((z_student @ columns.T / config.loss.temperature).masked_fill(
        positive, torch.finfo().min), dim=-1).view(n_crops, b, -1)
    keep = (~positive[:b]).float()
    loss = 0.0
    for target_view in range(n_global):
        pairs = [-(targets[target_view] * log_q[source] * keep).sum(-1).mean()
                 for source in range(n_crops) if source != target_view]
        loss = loss + sum(pairs) / (n_crops - 1)
    return loss / n_global


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', choices=sorted(step_configs.CONFIGS), default='tiny')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    args = parser.parse_args()
    config = step_configs.CONFIGS[args.config]()
    if config.loss.top_k:
        parser.error(f'--config {args.config} has top-k {config.loss.top_k}; this step has none')
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    student = Student(config)
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04)
    crops, images = config.crops, config.batch_size
    crops = [torch.randn(crops.n_global * images, 3, crops.global_size, crops.global_size),
             torch.randn(crops.n_local * images, 3, crops.local_size, crops.local_size)]
    momentum, clip = 0.995, config.optimizer.clip_grad

    def step():
        with torch.no_grad():
            z_teacher = teacher(crops)
        loss = bam_loss(student(crops), z_teacher, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
        optimizer.step()
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
        return float(loss.detach())

    for _ in range(2):
        step()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak_gib = _peak.process_peak_rss_gib()
    result = dict(config=args.config, images=images, threads=args.threads,
                  torch=torch.__version__, cpu=_peak.cpu_model(),
                  step_seconds_best=min(seconds), step_seconds_median=statistics.median(seconds),
                  peak_rss_gib=peak_gib, load_average=os.getloadavg()[0])
    print(f"{'config':<10} {'images':>6} {'best s':>7} {'median s':>8} {'peak RSS GiB':>12}"
          f"   ({result['cpu']})")
    print(f"{args.config:<10} {images:>6} {result['step_seconds_best']:7.2f} "
          f"{result['step_seconds_median']:8.2f} {peak_gib:12.2f}")
    print(json.dumps({'benchmark': 'torch_step', 'results': [result]}))


if __name__ == '__main__':
    main()
