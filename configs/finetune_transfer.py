r"""Transfer: fine-tunes a BAM ViT-S/16 end to end on a small data set, upscaled to 224 px.

MoCo v3's transfer recipe (facebookresearch/moco-v3, transfer/README.md: DeiT's code,
100 epochs, batch 128 per GPU on 8 GPUs, lr 3e-4 per 512, warm-up 3 epochs, no repeated
augmentation, per data set weight decay, random erasing, drop path, mixup and CutMix),
with its learning rate × 0.1, for ViT-S pretrained by BAM. The config argument after
':' picks the data set (TFDS name; default cifar10), its held-out split ('test') and the
values MoCo v3 sets for it:

  python train.py --config=configs/finetune_transfer.py:cifar10 \
    --workdir=gs://BUCKET/bam_vits16_cifar10 --config.init.workdir=gs://BUCKET/bam_vits16 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
  python train.py --config=configs/finetune_transfer.py:cifar100 \
    --workdir=gs://BUCKET/bam_vits16_cifar100 --config.init.workdir=gs://BUCKET/bam_vits16 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets

and likewise `:oxford_iiit_pet`, `:oxford_flowers102`. Prepare each with `tfds build NAME
--file_format=array_record`. Images of any size are resized (bicubic random resized
crops at 224 for training; resize 256 + centre crop 224 for the evaluation), as DeiT's
transfer does with CIFAR's 32 px images.
"""

from configs import finetune_imagenet

# MoCo v3 transfer/README.md, per data set: (weight decay, random erasing, drop path,
# mixup, CutMix).
MOCO_V3 = {
    'cifar10': (0.1, 0.0, 0.1, 0.8, 1.0),
    'cifar100': (0.1, 0.0, 0.1, 0.5, 1.0),
    'oxford_flowers102': (0.3, 0.25, 0.1, 0.0, 0.0),
    'oxford_iiit_pet': (0.1, 0.0, 0.0, 0.8, 0.0),
}


def get_config(dataset: str = 'cifar10'):
    if dataset not in MOCO_V3:
        raise ValueError(f'configs/finetune_transfer.py:{dataset}: expected one of '
                         f'{sorted(MOCO_V3)}.')
    weight_decay, erasing, drop_path, mixup, cutmix = MOCO_V3[dataset]
    config = finetune_imagenet.get_config()
    config.batch_size = 1024  # MoCo v3: --batch-size 128 on 8 GPUs
    config.epochs = 100  # MoCo v3: --epochs 100
    config.data.update(name=dataset, split='train', val_split='test')
    config.model.drop_path_rate = drop_path
    config.regularisers.update(mixup_alpha=mixup, cutmix_alpha=cutmix,
                               erasing_prob=erasing)
    # MoCo v3: --lr 3e-4 (per 512 in DeiT's code) --warmup-epochs 3; × 0.1 here.
    config.optimizer.update(lr=3e-5, lr_batch_base=512, warmup_epochs=3,
                            weight_decay=weight_decay)
    config.eval.batch_size = 1024
    return config
