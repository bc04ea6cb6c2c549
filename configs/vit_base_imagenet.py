r"""BAM ViT-B/16 on ImageNet: the official `scripts/pretrain/vit_base.slurm` run.

Identical to `vit_small_imagenet.py` but for the backbone, with gradient checkpointing
(the script's `--grad_checkpointing 4`; here every block is rematerialised).

  python train.py --config=configs/vit_base_imagenet.py --workdir=gs://BUCKET/bam_vitb16 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import vit_small_imagenet


def get_config():
    config = vit_small_imagenet.get_config()
    config.model.update(variant='base', embed_dim=768, depth=12, num_heads=12)
    config.model.remat = True
    return config
