"""Input pipeline: sources → host crops (grain) → device augmentations → train step.

A host batch (`pipeline.make_pipeline`, per process, b images) is a dict of NumPy arrays:
  'global': uint8 [n_global, b, G, G, 3]   crop v of all b images, crop-major
  'local':  uint8 [n_local, b, L, L, 3]    absent when n_local == 0
  'label':  int32 [b]                      -1 where the source has no labels
  'index':  int32 [b]                      the image's index in the source
  'seed':   uint32 [b, 2]                  the image's device-augmentation seed
`augment.augment_crops(batch, config.crops, rng)` turns the crops into normalised float32
inside the jitted step. Nothing here imports `bam_jax.train`.

No imports here: grain worker processes import `crops` and `sources` only, not JAX.
"""
