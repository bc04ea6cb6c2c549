r"""Fine-tunes a BAM ViT-S/16 end to end on ImageNet: DeiT's recipe, as the paper's Sec. 4.3.

The backbone starts from a pretraining workdir (its EMA teacher, as the official
evaluation uses), an exported or official checkpoint (--config.init.source=file
--config.init.file=...), or random initialisation (--config.init.source=random, the
baseline). A linear head on the CLS token is trained with the backbone; top-1/top-5 on
the validation split (resize 256, centre crop 224) are logged at every epoch's end.

  python train.py --config=configs/finetune_imagenet.py --workdir=gs://BUCKET/bam_vits16_ft \
    --config.init.workdir=gs://BUCKET/bam_vits16 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets

ViT-B/16: --config.model.variant=base --config.model.embed_dim=768 (and the pretrained
run's ViT-B workdir). Values and sources: DeiT's `main.py` defaults (facebookresearch/
deit), which the BAM paper, DINO and iBOT fine-tune with; the epoch count is DeiT's
fine-tuning of DINO/iBOT ViT-S/B (100), the paper's Sec. 4.3 text was not at hand.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    config = ml_collections.ConfigDict()
    config.task = 'finetune'
    config.seed = 0  # DeiT's --seed 0
    config.batch_size = 1024  # global; DeiT: 8 GPUs × 128 (its lr is per 512, below)
    config.epochs = 100  # DINO / iBOT fine-tune ViT-S/B with DeiT for 100 epochs
    config.compute_dtype = 'auto'
    config.shard_state = False
    # The head's size; None: the train split's class count. A value that differs from
    # the data's is refused.
    config.num_classes = placeholder(int)

    # The pretrained run's backbone (a mismatch is refused); drop_path_rate, remat and
    # attention may differ from pretraining.
    config.model = ml_collections.ConfigDict(dict(
        name='vit', variant='small', patch_size=16, img_size=224, embed_dim=384, depth=12,
        num_heads=12,
        drop_path_rate=0.1,  # DeiT --drop-path 0.1
        remat=False, attention='auto'))

    # Where the backbone starts: 'workdir' (a pretraining run's checkpoint: `weights`
    # 'teacher' by default, 'student'; `step` default the latest), 'file' (an exported
    # .safetensors/.pth or an official BAM checkpoint) or 'random'.
    config.init = ml_collections.ConfigDict(dict(
        source='workdir', workdir=placeholder(str), file=placeholder(str),
        weights=placeholder(str), step=placeholder(int)))

    # source: 'tfds' | 'folder' | 'mnist' | 'synthetic' (as the pretraining configs).
    config.data = ml_collections.ConfigDict(dict(
        source='tfds', name='imagenet2012', data_dir=placeholder(str), split='train',
        val_split='validation', folder_labels='auto', num_workers=10,
        max_bad_fraction=0.001, synthetic_num_examples=10_000,
        synthetic_image_shape=(375, 500)))

    # Host side: timm's `transforms_imagenet_train` as DeiT builds it: bicubic random
    # resized crop of scale (0.08, 1), flip 0.5, RandAugment rand-m9-mstd0.5-inc1.
    config.input = ml_collections.ConfigDict(dict(
        image_size=224, scale=(0.08, 1.0), flip_prob=0.5,
        randaugment='rand-m9-mstd0.5-inc1'))  # DeiT --aa

    # Device side, per device's part of the batch (timm under DDP): random erasing, then
    # mixup / CutMix with label smoothing (DeiT --reprob 0.25 --remode pixel, --mixup
    # 0.8 --cutmix 1.0 --mixup-prob 1.0 --mixup-switch-prob 0.5 --mixup-mode batch
    # --smoothing 0.1). mixup_alpha = cutmix_alpha = 0: no mixing, smoothing only.
    config.regularisers = ml_collections.ConfigDict(dict(
        mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, switch_prob=0.5,
        mixup_mode='batch', label_smoothing=0.1, erasing_prob=0.25, erasing_mode='pixel'))

    # DeiT: AdamW (eps 1e-8, betas 0.9/0.999), lr 5e-4 per 512 images (peak = lr ×
    # batch_size / lr_batch_base), warm-up 5 epochs from 1e-6, cosine to 1e-5, weight
    # decay 0.05 (not on biases, norms, position table, class token), no clipping.
    # layer_decay: per-block lr scales (1: none, DeiT's).
    config.optimizer = ml_collections.ConfigDict(dict(
        name='adamw', lr=5e-4, lr_batch_base=512, warmup_epochs=5, warmup_lr=1e-6,
        min_lr=1e-5, weight_decay=0.05, layer_decay=1.0, clip_grad=0.0, b1=0.9,
        b2=0.999, eps=1e-8))

    # Top-1 / top-5 on data.val_split every `every_epochs` epochs and after the last:
    # resize (default 256 for 224, `eval_input.default_resize_size`), centre crop.
    config.eval = ml_collections.ConfigDict(dict(
        every_epochs=1, batch_size=1024, resize_size=placeholder(int)))

    # Run control.
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000  # and at every epoch's end
    config.max_checkpoints = 3
    config.profile_steps = 0
    return config
