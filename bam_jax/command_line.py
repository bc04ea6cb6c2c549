"""What the commands share: config files with command-line overrides, one-line errors.

`train.py` and `python -m bam_jax.evaluate` take an ml_collections config file
(`--config=FILE`) whose keys are overridden with `--config.<key>=<value>`. The config is
locked, so a misspelt key stops the command before anything runs, with one
`error: --config.<key>: no such config key (...)` line and exit status 1. ml_collections
raises a KeyError or AttributeError for it (at definition time when the flag has a
default file, at parse time otherwise); both are turned into that line here.

No JAX here (importing this is instant, so are --help and flag errors).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags


def override_error(argv, error, names=('config',)) -> str:
    """A misspelt `--<name>.<key>` as one line, naming the override."""
    override = next((arg for arg in argv[1:]
                     if any(arg.startswith(f'--{name}.') for name in names)), '')
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    message = str(error.args[0] if error.args else error).replace('\n', ' ')
    return (f'{override.split("=")[0]}: no such config key ({message}). '
            'The config file lists the keys.')


def define_config_file(name: str, default: str | None, help_string: str):
    """`config_flags.DEFINE_config_file(..., lock_config=True)`; exits on a bad override."""
    try:  # With a default file, overrides are applied here already.
        return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
    except (AttributeError, KeyError) as error:
        sys.exit(f'error: {override_error(sys.argv, error, (name,))}')
    except flags.Error as error:  # a value of the wrong type
        sys.exit(f'error: {error}')


def parse_flags(argv, names=('config',)):
    """absl's parsing (`app.run(..., flags_parser=...)`), with a misspelt config key or a
    bad flag value reported as one `error:` line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        sys.exit(f'error: {override_error(argv, error, names)}')
    except flags.Error as error:
        sys.exit(f'error: {error}')
