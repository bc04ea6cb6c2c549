r"""BAM ViT-S/16 on ImageNet: the official `scripts/pretrain/vit_small.slurm` run.

Global batch 4096 (the script's 16 GPUs × 256), 400 epochs, AdamW, teacher, 2 global
(224 px, scale 0.25-1) + 6 local (96 px) crops, Sinkhorn ε 0.05 with 3 sweeps, τ 0.1,
top-k 128, 3-layer 4096-wide GELU projector without BN.

  python train.py --config=configs/vit_small_imagenet.py --workdir=gs://BUCKET/bam_vits16 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 1
    config.batch_size = 4096  # global, over all devices and hosts
    config.epochs = 400
    # Activations: 'auto' is bfloat16 on TPU/GPU, float32 on CPU; or 'float32' | 'bfloat16'.
    # Parameters, loss, Sinkhorn and optimizer are float32 in every case.
    config.compute_dtype = 'auto'
    # True: params, teacher and optimizer moments split over the devices (FSDP), not copied.
    config.shard_state = False

    # variant names the timm model; embed_dim, depth and num_heads size it (ViT-S: BAM's
    # 12 heads, not timm's 6). attention: 'auto' is 'einsum' (the CPU-tuned form) on CPU
    # and 'dot_product_attention' (jax.nn's: cuDNN's fused kernel on GPU, XLA's on TPU)
    # on TPU/GPU; the two compute the same function. drop_path_rate (every backbone): the
    # last block's stochastic depth, timm's linear schedule; 0 in pretraining (the official
    # scripts' --drop_path_rate 0), for fine-tuning.
    config.model = ml_collections.ConfigDict(dict(
        name='vit', variant='small', patch_size=16, img_size=224, embed_dim=384, depth=12,
        num_heads=12, drop_path_rate=0.0, remat=False, attention='auto'))
    config.projector = ml_collections.ConfigDict(dict(
        n_layers=3, hidden_dim=4096, out_dim=4096, activation='gelu', use_bias=True,
        use_bn=False, last_bn=False))
    config.teacher = True
    config.teacher_momentum = 0.995  # cosine to 1 over training

    config.crops = ml_collections.ConfigDict(dict(
        n_global=2, global_size=224, global_scale=(0.25, 1.0),
        n_local=6, local_size=96, local_scale=(0.05, 0.25)))
    # `DataAugmentationDINO` (official §5.1): host flip; device jitter, grayscale, blur,
    # solarise, with per-view probabilities for the global crops (global 1, global 2).
    config.crops.update(dict(
        flip_prob=0.5, jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
        hue=0.1, grayscale_prob=0.2, blur_sigma=(0.1, 2.0), global_blur_prob=(1.0, 0.1),
        local_blur_prob=0.5, global_solarize_prob=(0.0, 0.2), local_solarize_prob=0.0,
        ccrop_alpha=0.6))

    # source: 'tfds' (ArrayRecord, by name) | 'folder' (data_dir/split/<class>/<image>,
    # or data_dir/split/<image> unlabelled) | 'mnist' (embedded 4,000 / 1,000) | 'synthetic'.
    config.data = ml_collections.ConfigDict(dict(
        source='tfds', name='imagenet2012',
        data_dir=placeholder(str),  # TFDS data_dir (default ~/tensorflow_datasets) or folder root
        split='train',
        # folder only. 'auto': <split>/<class>/<image> is labelled by class, while images
        # lying directly in <split>/ make it unlabelled; 'none': unlabelled, every image
        # below <split>/ at any depth.
        folder_labels='auto',
        num_workers=10,  # per process, as the official loader's --num_workers 10
        max_bad_fraction=0.001,  # stop the run when more images than this are unreadable
        synthetic_num_examples=10_000, synthetic_image_shape=(375, 500),
        # ContrastiveCrop (official scripts: on, warm-up 40, boxes every 40 epochs).
        ccrop=True, ccrop_warmup_epochs=40, ccrop_loc_interval=40, ccrop_image_size=224,
        ccrop_box_threshold=0.1))

    config.loss = ml_collections.ConfigDict(dict(
        n_target_crops=2, temperature=0.1, sinkhorn_reg=0.05, sinkhorn_reg_final=0.05,
        sinkhorn_iters=3, top_k=128, positive_masking=True))

    config.optimizer = ml_collections.ConfigDict(dict(
        name='adamw',
        lr=3e-4,  # per 256 images: the peak is lr × batch_size / 256 = 4.8e-3
        min_lr=1e-3, warmup_epochs=40, weight_decay=0.04, weight_decay_end=0.4,
        clip_grad=0.3, b1=0.9, b2=0.999, eps=1e-8, lars_momentum=0.9, lars_eta=0.001))

    # Online kNN (official §6.1): every `every_epochs` epochs (0: off) and after the last,
    # student and teacher, on a class-balanced `train_fraction` of `train_split` (default:
    # data.split) against all of `val_split`. Off, with one line, when the train split has
    # no labels (an unlabelled folder) and no labelled `train_split` is given.
    config.knn = ml_collections.ConfigDict(dict(
        every_epochs=16, train_split=placeholder(str), train_fraction=0.1,
        val_split='validation', k=20,
        temperature=0.07, resize_size=256, image_size=224, batch_size=1024))

    # Run control.
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000  # and at every epoch's end
    config.max_checkpoints = 3
    config.profile_steps = 5  # a profiler trace of this many steps (TensorBoard); 0: none
    return config
