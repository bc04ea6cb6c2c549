r"""BAM CAFormer-M36 on ImageNet: the official `scripts/pretrain/caformer_m36.slurm` run.

Identical to `vit_base_imagenet.py` but for the backbone (the script differs from
`vit_base.slurm` only in `--arch`; its `--qkv_bias true` does not reach CAFormer, whose
attention has no biases). Gradient checkpointing as the script's
`--grad_checkpointing 4`; here every block is rematerialised. ContrastiveCrop uses the
last attention block's maps averaged over the queries (see `bam_jax/models/caformer.py`;
the official code crashes there, bug B7).

  python train.py --config=configs/caformer_m36_imagenet.py \
    --workdir=gs://BUCKET/bam_caformer_m36 \
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

import ml_collections

from configs import vit_base_imagenet


def get_config():
    config = vit_base_imagenet.get_config()
    # depths and dims size it (blocks and width per stage; these are M36's).
    config.model = ml_collections.ConfigDict(dict(
        name='caformer_m36', depths=(3, 12, 18, 3), dims=(96, 192, 384, 576),
        drop_path_rate=0.0, remat=True))
    return config
