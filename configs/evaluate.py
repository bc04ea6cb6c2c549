r"""Evaluation protocols of `python -m bam_jax.evaluate` (official values where there are any).

Unset (None) data and kNN keys come from the run's config (`config.data`, `config.knn`:
for the MNIST default, all 4,000 'train' digits against the 1,000 'test' digits at 32 px).
The run's config may also hold settings of its own in an `evaluation` section, which
override these (`configs/mnist.py`: the linear probe that suits digits); `--config.<key>`
overrides win over both.

  python -m bam_jax.evaluate --workdir=runs/mnist --out=runs/mnist/eval.json
  python -m bam_jax.evaluate --workdir=runs/mnist --features=pixels \
    --config.protocols=knn,linear --config.linear.epochs=10

The official ViT-B protocol (one block's CLS and average patch token, a BN head) is
`--config.linear.n_last_blocks=1 --config.linear.avgpool=True --config.linear.bn_head=True
--config.linear.lr=0.002`; an official checkpoint is evaluated with `--backbone=FILE
--run_config=configs/vit_base_imagenet.py`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    config = ml_collections.ConfigDict()
    # Any of knn, linear, logreg, fewshot, retrieval, kmeans, attention, davis,
    # comma-separated.
    config.protocols = 'knn,linear'

    config.data = ml_collections.ConfigDict(dict(
        train_split=placeholder(str),  # default: the run's config.data.split
        test_split=placeholder(str),  # default: the run's config.knn.val_split
        image_size=placeholder(int),  # default: config.knn.image_size
        resize_size=placeholder(int),  # default: config.knn.resize_size
        batch_size=placeholder(int),  # global; default: config.knn.batch_size
        # The kNN memory bank, few-shot, retrieval and k-means use a class-balanced
        # fraction of train (official kNN: 0.1 of ImageNet); default config.knn's.
        train_fraction=placeholder(float),
        num_workers=0,  # grain decoding processes
    ))
    # Raw-pixel features (--features=pixels): the evaluation crops resized to this side.
    config.pixels_size = 32

    config.knn = ml_collections.ConfigDict(dict(
        k=placeholder(int), temperature=placeholder(float)))  # default: config.knn's

    # `eval_linear.py` defaults (ViT-S protocol: the last 4 CLS tokens); the official
    # ViT-B script uses n_last_blocks=1, avgpool=True, bn_head=True, lr=0.002.
    config.linear = ml_collections.ConfigDict(dict(
        epochs=100, lr=0.001, batch_size=1024, n_last_blocks=4, avgpool=False,
        bn_head=False,
        augment=True,  # official; False: centre-crop features computed once (faster)
        # The official training views: RandomResizedCrop(scale 0.08-1) and a flip.
        crop_scale=(0.08, 1.0), flip_prob=0.5,
        train_fraction=1.0, seed=0))

    # Transfer by L-BFGS logistic regression on the shared features (Table 5, top; the
    # protocol of SimCLR/BYOL and Kornblith et al. 2019): λ (per example, the objective's
    # (λ/2)‖W‖² beside the mean cross-entropy; scikit-learn's C = 1 / (n·λ)) chosen on a
    # validation split, then refitted on train + validation and scored on test.
    config.logreg = ml_collections.ConfigDict(dict(
        num_lambdas=45,  # SimCLR / BYOL / Kornblith et al.: 45 log-spaced values...
        lambda_range=(1e-6, 1e5),  # ...between 1e-6 and 1e5
        # A split holding the validation examples; default: carve a class-balanced
        # validation_fraction of train (eval_input.balanced_subset), as those papers do
        # for data sets without one.
        validation_split=placeholder(str),
        # Ours: a 20 % hold-out; the papers hold out part of train without one fraction.
        validation_fraction=0.2,
        # L-BFGS iterations per fit. Ours: scikit-learn's default (100) stops short at
        # small λ; the papers fit to convergence.
        max_iters=1000,
        # On the mean objective's gradient norm: scikit-learn's default tol value (it
        # bounds the largest gradient component there).
        tol=1e-4,
        seed=0))  # of the validation carve (balanced_subset's; official kNN: 0)

    config.fewshot = ml_collections.ConfigDict(dict(
        split='test', n_way=5, n_shot=5, n_query=15, n_episodes=600,
        classifier='prototype', seed=0))
    config.retrieval = ml_collections.ConfigDict(dict(split='test', ks=(1, 2, 4, 8)))
    config.kmeans = ml_collections.ConfigDict(dict(
        split='test', n_clusters=placeholder(int), n_init=10, max_iters=100, seed=0))
    # Last-block attention maps of the first test images (ViT, CAFormer), as PNGs in a
    # directory beside --out (OUT_STEM.attention/).
    config.attention = ml_collections.ConfigDict(dict(num_images=8))

    # DAVIS-2017 video object segmentation by label propagation: DINO's
    # eval_video_segmentation.py, which BAM runs, value for value (ViT backbones). The
    # masks, as DAVIS PNGs, and overlays go to OUT_STEM.davis/ (bam_jax/evaluate/davis.py).
    config.davis = ml_collections.ConfigDict(dict(
        # A DAVIS-2017 root as DAVIS ships it (JPEGImages/<resolution>/<seq>/*.jpg,
        # Annotations/<resolution>/<seq>/*.png, ImageSets/2017/<split>.txt); unset: the
        # prepared TFDS data set below.
        root=placeholder(str),
        resolution='480p',  # DINO's --data_path layout
        tfds_name='davis/480p',  # TFDS's `davis` builder, 480p config (ArrayRecord)
        tfds_data_dir=placeholder(str),  # default: TFDS's (~/tensorflow_datasets)
        split='val',  # DINO: ImageSets/2017/val.txt (TFDS: 'validation')
        sequences='',  # comma-separated names; '' = every sequence of the split
        short_side=480,  # DINO read_frame's scale_size
        long_side_multiple=64,  # DINO read_frame floors the long side to a multiple of 64
        mean=(0.485, 0.456, 0.406),  # DINO color_normalize
        std=(0.228, 0.224, 0.225),  # DINO color_normalize (0.228, not ImageNet's 0.229)
        norm=True,  # final norm on the last-block patch tokens (get_intermediate_layers)
        # DINO --n_last_frames (7); a tuple sweeps values (BAM Table 6), a row each.
        n_last_frames=(7,),
        size_mask_neighborhood=12,  # DINO --size_mask_neighborhood (patches)
        topk=5,  # DINO --topk
        temperature=0.1,  # DINO label_propagation: exp(cos / 0.1)
        batch_size=8,  # frames per feature batch (a multiple of the devices; DINO: 1)
        overlay_sequences=2,  # sequences that get an overlay strip (PNG) and GIF
    ))
    return config
