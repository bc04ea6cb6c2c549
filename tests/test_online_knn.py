"""`online.make_online_knn`: on or off, and on what, in one line; on generated user data."""

import logging

from absl import flags
import pytest

from bam_jax.data import sources
from bam_jax.train import builder, online
from conftest import data_mesh
import user_data

flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

# configs/vit_small_imagenet.py shrunk by command-line keys only.
TINY = ('--config.model.embed_dim=32', '--config.model.depth=1', '--config.model.num_heads=2',
        '--config.model.patch_size=8', '--config.model.img_size=32',
        '--config.projector.hidden_dim=64', '--config.projector.out_dim=32',
        '--config.crops.global_size=32', '--config.crops.local_size=16',
        '--config.knn.image_size=32', '--config.knn.resize_size=36',
        '--config.knn.batch_size=16', '--config.batch_size=16')


@pytest.fixture(autouse=True)
def label_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.LABEL_CACHE_ENV, str(tmp_path / 'labels'))


def decide(caplog, *overrides):
    """(make_online_knn's result, its one log line, the config) for the shrunk config with
    `overrides`."""
    config = user_data.shipped_config(*TINY, *overrides)
    mesh = data_mesh(2)
    backbone = builder.build_network(config).backbone
    caplog.clear()
    with caplog.at_level(logging.INFO):
        knn = online.make_online_knn(config, backbone, sources.make_source(config.data), mesh)
    lines = [record.getMessage() for record in caplog.records
             if record.getMessage().startswith('Online kNN')]
    assert len(lines) == 1, lines
    return knn, lines[0], config


def test_on_for_tfds_imagenet_and_above_chance(tfds_imagenet_dir, caplog):
    knn, line, config = decide(caplog, f'--config.data.data_dir={tfds_imagenet_dir}',
                               '--config.knn.train_fraction=0.25')
    # TFDS labels are read in a daemon thread: the run starts without waiting for them.
    assert line == ("Online kNN every 16 epochs: 25 % of imagenet2012 'train' (class-balanced; "
                    "its labels are read in the background) against 'validation' (48 images).")
    results = knn(builder.build_training(config, data_mesh(2), steps_per_epoch=8).state)
    assert knn.num_train == 32 and knn.num_classes == 4  # the bank, chosen at the first call
    # A random-init backbone on 4 colour-and-stripe classes (chance 25 %): measured 100;
    # labels out of step with the bank's images would give about 25.
    assert results['knn/student_top1'] >= 90
    assert results['knn/teacher_top1'] == results['knn/student_top1']  # teacher = student
    assert results['knn/student_top5'] == 100  # only 4 classes


def test_off_when_every_epochs_is_0(tfds_imagenet_dir, caplog):
    knn, line, _ = decide(caplog, f'--config.data.data_dir={tfds_imagenet_dir}',
                          '--config.knn.every_epochs=0')
    assert knn is None
    assert line == ('Online kNN off: config.knn.every_epochs=0; set it to N > 0 to evaluate '
                    'every N epochs.')


def test_unlabelled_folder_turns_it_off_unless_a_labelled_split_is_named(image_folder_flat,
                                                                         caplog):
    folder = ('--config.data.source=folder', f'--config.data.data_dir={image_folder_flat}')
    knn, line, _ = decide(caplog, *folder)
    assert knn is None
    assert line == (f'Online kNN off: the folder {image_folder_flat}/train has no labels; set '
                    'config.knn.train_split=<a labelled split> to turn it on.')
    knn, line, _ = decide(caplog, *folder, '--config.knn.train_split=validation',
                          '--config.knn.train_fraction=0.5', '--config.knn.every_epochs=4')
    assert knn is not None and knn.num_train == 24 and knn.num_classes == 4
    assert line == (f'Online kNN every 4 epochs: 50 % of the folder {image_folder_flat}/'
                    'validation (class-balanced, 24 images, 4 classes) against '
                    "'validation' (48 images).")
    knn, line, _ = decide(caplog, '--config.data.source=folder',
                          f'--config.data.data_dir={image_folder_flat}/..',
                          '--config.data.split=labelled/train', '--config.knn.train_fraction=1',
                          '--config.knn.val_split=labelled/validation')
    assert knn.num_train == 128
    assert line.endswith("all of the folder "
                         f"{image_folder_flat}/../labelled/train (128 images, 4 classes) "
                         "against 'labelled/validation' (48 images).")


def test_an_unusable_split_named_by_a_key_is_one_line(image_folder_flat, tfds_imagenet_dir):
    folder = ('--config.data.source=folder', f'--config.data.data_dir={image_folder_flat}')
    cases = {
        (*folder, '--config.data.split=validation', '--config.knn.train_split=train'):
            f"config.knn.train_split='train': the folder {image_folder_flat}/train has no "
            'labels; name a labelled split, or set config.knn.every_epochs=0.',
        (*folder, '--config.data.split=validation', '--config.knn.val_split=train'):
            f"config.knn.val_split='train': the folder {image_folder_flat}/train has no "
            'labels; name a labelled split, or set config.knn.every_epochs=0.',
        (*folder, '--config.knn.train_split=valid'):
            f"config.knn.train_split='valid': Image folder '{image_folder_flat}/valid' does "
            'not exist or is not a directory.',
        (f'--config.data.data_dir={tfds_imagenet_dir}', '--config.knn.val_split=test'):
            "config.knn.val_split='test': TFDS data set 'imagenet2012': Unknown split 'test'",
    }
    for overrides, message in cases.items():
        config = user_data.shipped_config(*TINY, *overrides)
        with pytest.raises(sources.DataError) as error:
            online.make_online_knn(config, None, sources.make_source(config.data), None)
        assert str(error.value).startswith(message) and '\n' not in str(error.value)
