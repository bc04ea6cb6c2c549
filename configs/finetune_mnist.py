r"""Fine-tunes the MNIST default run's backbone end to end: minutes on a CPU.

After `python train.py` (the MNIST default, workdir runs/mnist), its EMA teacher with a
10-class linear head is trained on the 4,000 'train' digits and evaluated on the 1,000
'test' digits at every epoch's end:

  python train.py --config=configs/finetune_mnist.py --workdir=runs/mnist_finetune
  python train.py --config=configs/finetune_mnist.py --workdir=runs/mnist_finetune_random \
    --config.init.source=random

The second is the baseline: the same recipe from the same architecture's random
initialisation. DeiT's recipe (configs/finetune_imagenet.py) with sizes and the
augmentations scaled to 32 px digits: the pretraining run's ViT (width 256, depth 4,
16 px patches), crops of scale 0.4-1 and no flip (as its pretraining crops: digits are not
mirror-symmetric), no RandAugment (its photometric ops do nothing to grey digits, as in
pretraining), and no mixup / CutMix (on 4 patches per digit a CutMix box is a quarter to
a whole digit); label smoothing, random erasing and drop path as DeiT. docs/evaluation.md
("Fine-tuning MNIST, measured") compares it with the run's linear probe.
"""

from configs import finetune_imagenet, mnist


def get_config():
    config = finetune_imagenet.get_config()
    pretraining = mnist.get_config()
    config.seed = 0
    config.batch_size = 128  # as the pretraining run
    config.epochs = 10
    config.num_classes = 10

    config.model.update(pretraining.model)  # the pretrained backbone's architecture
    config.model.drop_path_rate = 0.1  # DeiT
    config.init.update(source='workdir', workdir='runs/mnist')

    config.data.update(source='mnist', name='mnist', split='train', val_split='test',
                       num_workers=0)
    config.input.update(image_size=32, scale=(0.4, 1.0), flip_prob=0.0, randaugment='')
    config.regularisers.update(mixup_alpha=0.0, cutmix_alpha=0.0)  # smoothing 0.1 stays
    # DeiT's rate is 5e-4 per 512 images; 4,000 digits give 31 steps an epoch, so the
    # rate is the pretraining run's 2e-3 per 256 (lr_batch_base 256), warm-up 1 epoch.
    config.optimizer.update(lr=2e-3, lr_batch_base=256, warmup_epochs=1, min_lr=1e-5)
    config.eval.update(every_epochs=1, batch_size=512)

    config.log_every_steps = 10
    config.checkpoint_every_steps = 200
    return config
