r"""BAM ResNet-50 on ImageNet with LARS, as the paper trains it.

The official repository has no ResNet script. The paper gives LARS with lr 0.3 per 256
images (peak 0.3 × 4096 / 256 = 4.8), weight decay 1e-6, 10 warm-up epochs, a cosine
schedule, gradient clipping 0.3 and a ReLU projector; everything else is the official
ViT scripts' (global batch 4096, 400 epochs, teacher, 2 global + 6 local crops,
Sinkhorn ε 0.05 × 3 sweeps, τ 0.1, top-k 128, 3-layer 4096-wide projector without BN,
min lr 1e-3). ContrastiveCrop is off: it needs attention maps, and the official code
asserts a ViT there (bug B7). BatchNorm statistics are over the global batch.

  python train.py --config=configs/resnet50_imagenet.py --workdir=gs://BUCKET/bam_r50 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

import ml_collections

from configs import vit_small_imagenet


def get_config():
    config = vit_small_imagenet.get_config()
    # stage_depths and width size it ((3, 4, 6, 3) and 64: ResNet-50).
    config.model = ml_collections.ConfigDict(dict(name='resnet50', stage_depths=(3, 4, 6, 3),
                                                  width=64, drop_path_rate=0.0))
    config.projector.activation = 'relu'
    config.data.ccrop = False
    config.optimizer.update(
        name='lars',
        lr=0.3,  # per 256 images: the peak is lr × batch_size / 256 = 4.8
        warmup_epochs=10, weight_decay=1e-6, weight_decay_end=1e-6, clip_grad=0.3)
    return config
