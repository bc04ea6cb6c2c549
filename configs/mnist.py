r"""BAM on the embedded MNIST digits: the default of `python train.py`, minutes on a CPU.

The method is the paper's (teacher, multi-crop, Sinkhorn targets, positive masking);
only sizes are scaled to 32 px digits and a 2-core CPU: a small ViT with 8 px patches,
2 global crops of 32 px and 4 local crops of 16 px, a narrow projector, short schedule.
Digits are not mirror-symmetric, so the horizontal flip is off; the blur's σ range is
scaled with the crop size (0.1-2 px at 224 → 0.1-0.5 px at 32).

  python train.py                          # = --config=configs/mnist.py --workdir=runs/mnist
  python train.py --config=configs/mnist.py --workdir=/tmp/bam_mnist --config.epochs=5
"""

from configs import vit_small_imagenet


def get_config():
    config = vit_small_imagenet.get_config()
    config.seed = 0
    config.batch_size = 128
    config.epochs = 20

    config.model.update(variant='tiny', patch_size=8, img_size=32, embed_dim=128, depth=4,
                        num_heads=4)
    # BN in the projector (an official option, `--proj_use_bn`) spreads the embeddings of
    # near-identical digits at initialisation; without it the targets start uniform.
    config.projector.update(hidden_dim=512, out_dim=256, use_bn=True)
    config.teacher_momentum = 0.99

    config.crops.update(global_size=32, global_scale=(0.4, 1.0), n_local=4, local_size=16,
                        local_scale=(0.1, 0.4), flip_prob=0.0, blur_sigma=(0.1, 0.5))
    config.data.update(source='mnist', name='mnist', split='train', num_workers=0,
                       ccrop=False)
    config.loss.update(top_k=0)
    config.optimizer.update(lr=2e-3, min_lr=1e-5, warmup_epochs=2)

    config.knn.update(every_epochs=5, train_fraction=1.0, val_split='test', resize_size=32,
                      image_size=32, batch_size=512)
    config.log_every_steps = 10
    config.checkpoint_every_steps = 200
    config.profile_steps = 0
    return config
