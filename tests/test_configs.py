"""Every key of every shipped config can be set from the command line.

ml_collections cannot override a field whose value is None, nor add a key a config
lacks; so the configs use typed placeholders, and every config has the keys that size
its backbone. Each leaf is parsed here from a real `--config.<key>=<value>` flag, as
`train.py` and `python -m bam_jax.evaluate` parse them.
"""

import pathlib

import pytest
from absl import flags
from ml_collections import config_dict, config_flags

from conftest import REPO

CONFIGS = sorted(path for path in (REPO / 'configs').glob('*.py') if path.stem != '__init__')
SIZE_KEYS = {'vit': ('embed_dim', 'depth', 'num_heads', 'patch_size', 'img_size'),
             'resnet50': ('stage_depths', 'width'), 'caformer_m36': ('depths', 'dims')}


def parse(config_file: pathlib.Path, *overrides: str) -> config_dict.ConfigDict:
    values = flags.FlagValues()
    argv = ['prog', f'--config={config_file}', *overrides]
    config_flags.DEFINE_config_file('config', None, 'the config', flag_values=values,
                                    lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def leaves(config, prefix=''):
    """(dotted key, value, type) of every leaf; a placeholder's type is its field's."""
    for key in config.keys():
        value = config[key]
        if isinstance(value, config_dict.ConfigDict):
            yield from leaves(value, f'{prefix}{key}.')
        else:
            field = config._fields[key]
            kind = field.get_type() if isinstance(field, config_dict.FieldReference) \
                else type(value)
            yield f'{prefix}{key}', value, kind


def another_value(value, kind):
    """A different value of the leaf's type, and its command-line text."""
    if kind is bool:
        return (not value), str(not value)
    if kind is int:
        return (value or 0) + 3, str((value or 0) + 3)
    if kind is float:
        return (value or 0.0) + 0.25, repr((value or 0.0) + 0.25)
    if kind is str:
        return f'{value or "x"}_2', f'{value or "x"}_2'
    if kind is tuple:
        changed = tuple(type(item)(item + 1) for item in value)
        return changed, repr(changed)
    raise AssertionError(f'a leaf of type {kind} cannot be set from the command line')


@pytest.mark.parametrize('config_file', CONFIGS, ids=lambda path: path.stem)
def test_every_leaf_takes_a_command_line_override(config_file):
    config = parse(config_file)
    checked = 0
    for key, value, kind in leaves(config):
        assert kind is not type(None), f'{config_file.name}: config.{key} is None-typed'
        expected, text = another_value(value, kind)
        parsed = parse(config_file, f'--config.{key}={text}')
        node = parsed
        for part in key.split('.'):
            node = node[part]
        assert node == expected, (config_file.name, key, text)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize('config_file', [path for path in CONFIGS if path.stem != 'evaluate'],
                         ids=lambda path: path.stem)
def test_every_training_config_has_its_backbone_size_keys(config_file):
    model = parse(config_file).model
    assert set(SIZE_KEYS[model.name]) <= set(model.keys()), config_file.name
    assert parse(config_file, '--config.data.data_dir=/somewhere').data.data_dir == '/somewhere'
