r"""BAM on the embedded MNIST digits: the default of `python train.py`, minutes on a CPU.

The method is the paper's (teacher, Sinkhorn targets, positive masking); only sizes are
scaled to 32 px digits and a 2-core CPU: a ViT of width 256 and depth 4 on 16 px patches,
2 global crops of 32 px and no local crops, a narrow projector, 10 epochs (about 3 minutes
on 2 idle Xeon cores, kNN included). docs/training.md ("The MNIST default, measured") has
the table of the variants tried behind each value.

Why 16 px patches (2 × 2 per digit): BAM's targets are the teacher's own similarities,
so training refines the neighbourhoods the backbone starts with. A random ViT's CLS
token averages its patch tokens, which blurs a digit's layout the more patches there
are: kNN top-1 of the random backbone is 63 % with 8 px patches (4 × 4), 86 % with 16 px
patches; BAM from 8 px patches stays below 82 %.

Why near-whole crops and no local crops: BAM learns the invariances its crops ask for.
A local crop (10-40 % of a 32 px digit) is a piece of stroke that many digits share, and
matching its neighbourhood to the whole digit's merges classes: with the ImageNet
configs' kind of crops every backbone tried settled at 87-91 % kNN. Global crops of
85-100 % of the digit lift the teacher's kNN to 93.5 % in half the time (top-k 16: each
row's target keeps its 16 nearest columns, about the digits of its class in a batch).

Digits are not mirror-symmetric, so the horizontal flip is off. The photometric
augmentations are off too: the digits are grey, so saturation, hue and grayscale do
nothing, solarising inverts the strokes, and with them (jitter, blur, solarise as the
ImageNet configs) kNN top-1 after 20 epochs was 1.6 points lower. The blur's σ range,
should it be turned back on, is scaled with the crop size (0.1-2 px at 224 → 0.1-0.5 px).

  python train.py                          # = --config=configs/mnist.py --workdir=runs/mnist
  python train.py --config=configs/mnist.py --workdir=runs/mnist_5_epochs --config.epochs=5
"""

from configs import vit_small_imagenet


def get_config():
    config = vit_small_imagenet.get_config()
    config.seed = 0
    config.batch_size = 128
    config.epochs = 10  # longer runs drift down (docs/training.md)

    config.model.update(variant='tiny', patch_size=16, img_size=32, embed_dim=256, depth=4,
                        num_heads=8)
    # BN in the projector (an official option, `--proj_use_bn`) spreads the embeddings of
    # near-identical digits at initialisation; without it the targets start uniform.
    config.projector.update(hidden_dim=512, out_dim=256, use_bn=True)
    config.teacher_momentum = 0.99

    config.crops.update(global_size=32, global_scale=(0.85, 1.0), n_local=0, local_size=16,
                        local_scale=(0.1, 0.4), flip_prob=0.0, jitter_prob=0.0,
                        grayscale_prob=0.0, global_blur_prob=(0.0, 0.0), local_blur_prob=0.0,
                        global_solarize_prob=(0.0, 0.0), blur_sigma=(0.1, 0.5))
    config.data.update(source='mnist', name='mnist', split='train', num_workers=0,
                       ccrop=False)
    config.loss.update(top_k=16)
    config.optimizer.update(lr=2e-3, min_lr=1e-5, warmup_epochs=2)

    config.knn.update(every_epochs=5, train_fraction=1.0, val_split='test', resize_size=32,
                      image_size=32, batch_size=512)
    config.log_every_steps = 10
    config.checkpoint_every_steps = 200
    config.profile_steps = 0

    # `python -m bam_jax.evaluate` settings for this run (over configs/evaluate.py's):
    # 4 steps of 1,024 digits per epoch, so a BN head and a larger rate keep the
    # linear probe's SGD stable; the pretraining's crops, without flips (with crops of
    # 40-100 % the probe of the same teacher gets 87.5 %, not 94.8 %).
    config.evaluation = dict(linear=dict(bn_head=True, lr=0.1, crop_scale=(0.85, 1.0),
                                         flip_prob=0.0))
    return config
