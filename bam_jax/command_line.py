"""What the commands share: help, quiet start-up, config files with overrides, one-line errors.

`train.py` and `python -m bam_jax.evaluate` take an ml_collections config file
(`--config=FILE`) whose keys are overridden with `--config.<key>=<value>`. The config is
locked, so a misspelt key stops the command before anything runs, with one
`error: --config.<key>: no such config key (...)` line naming the flag that holds it, and
exit status 1. ml_collections raises a KeyError or AttributeError for it (at definition
time when the flag has a default file, at parse time otherwise); both become that line here.

`--help` (or `-h`) of every command prints its docstring and its own flags (the config
flags included) and exits 0: the commands import JAX, TensorFlow, orbax and clu only after
their flags are parsed, so it answers at once. `quiet_startup` turns the libraries'
start-up chatter off before they are imported.

No JAX here (importing this is instant, so are --help and flag errors).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

HELP = ('--help', '-h', '-?', '--helpshort')  # absl's --helpfull lists every library's flags
# The libraries' own switches, set unless the user set them (see `quiet_startup`).
QUIET_ENVIRONMENT = {
    # C++ logs of TensorFlow and XLA: no INFO lines (TensorFlow's CPU-instructions banner);
    # warnings and errors still print.
    'TF_CPP_MIN_LOG_LEVEL': '1',
    # TensorFlow only decodes images and writes TensorBoard files here; its oneDNN kernels
    # (math ops, unused) announce themselves on every import, whatever the log level.
    'TF_ENABLE_ONEDNN_OPTS': '0',
    # libtpu: warnings and errors on stderr; everything still goes to /tmp/tpu_logs.
    'TPU_STDERR_LOG_LEVEL': '1',
}
# Python loggers whose INFO lines are start-up noise; their warnings still print.
QUIET_LOGGERS = (
    'jax._src.xla_bridge',  # "Unable to initialize backend 'tpu'" on every CPU/GPU host
)


def quiet_startup():
    """Silences TensorFlow's, XLA's, libtpu's and JAX's start-up INFO lines.

    Call it before TensorFlow or JAX is imported: the environment switches are read once,
    when their libraries load. Warnings and errors (ours, a corrupt image, a preemption,
    a missing GPU driver) still print.
    """
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def asks_for_help(argv, options=HELP) -> bool:
    arguments = argv[1:]
    if '--' in arguments:
        arguments = arguments[:arguments.index('--')]
    return any(argument in options for argument in arguments)


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argparse parser whose --help shows the command's docstring as written."""
    return argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


# ---------------------------------------------------------------------------
# absl commands with ml_collections config files.
# ---------------------------------------------------------------------------
def _config_file(argv, name: str, default: str | None) -> str | None:
    for index, argument in enumerate(argv):
        if argument.startswith(f'--{name}='):
            return argument.split('=', 1)[1]
        if argument == f'--{name}' and index + 1 < len(argv):
            return argv[index + 1]
    return default


def _bad_override(argv, name: str, config_file: str | None) -> str | None:
    """The first `--<name>.<key>` of argv whose key the config file lacks."""
    overrides = [argument.split('=', 1)[0] for argument in argv[1:]
                 if re.match(rf'--(no)?{re.escape(name)}\.', argument)]
    if not overrides or config_file is None:
        return None
    try:
        config = config_flags.config_flags.ConfigFileFlagParser(name).parse(config_file)
    except Exception:  # a broken file: ml_collections reports it itself
        return None
    for override in overrides:
        path = override.split('.', 1)[1]
        try:
            config_path.get_value(path, config)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            return override
    return None


def override_error(argv, error, names=('config',), defaults=None) -> str:
    """A misspelt `--<name>.<key>` as one line, naming the override that holds it."""
    defaults = defaults or {}
    override = None
    for name in names:
        override = _bad_override(argv, name, _config_file(argv, name, defaults.get(name)))
        if override:
            break
    if override is None:  # unknown which: the first override
        override = next((argument.split('=', 1)[0] for argument in argv[1:]
                         if any(argument.startswith(f'--{name}.') for name in names)), '')
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    message = str(error.args[0] if error.args else error).replace('\n', ' ')
    return f'{override}: no such config key ({message}). The config file lists the keys.'


def define_config_file(name: str, default: str | None, help_string: str):
    """`config_flags.DEFINE_config_file(..., lock_config=True)`, listed by `--help`;
    exits on a bad override."""
    try:  # With a default file, overrides are applied here already.
        holder = config_flags.DEFINE_config_file(name, default, help_string,
                                                 lock_config=True)
    except (AttributeError, KeyError) as error:
        sys.exit(f'error: {override_error(sys.argv, error, (name,), {name: default})}')
    except flags.Error as error:  # a value of the wrong type
        sys.exit(f'error: {one_line(error)}')
    # absl's short help lists the main module's key flags; this one is defined here.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    return holder


def parse_flags(argv, names=('config',)):
    """absl's parsing (`app.run(..., flags_parser=...)`): `--help` prints the command's
    docstring and flags (`--helpfull` every library's too) and exits 0, not absl's 1; a
    misspelt config key or a bad flag value is one `error:` line."""
    if asks_for_help(argv, ('--helpfull',)):
        app.usage(writeto_stdout=True, exitcode=0)
    if asks_for_help(argv):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    try:
        remaining = flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        sys.exit(f'error: {override_error(argv, error, names)}')
    except flags.Error as error:
        sys.exit(f'error: {one_line(error)}')
    for name in names:
        _check_loaded(name)
    return remaining


def one_line(error: BaseException) -> str:
    """A multi-line message (a traceback quoted by ml_collections) as its first line and
    its last, which says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    return f'{lines[0].rstrip(":")} ({lines[-1]})'


def _check_loaded(name: str):
    """ml_collections reports a config file it cannot load (missing, or failing in
    `get_config`) only when the config is first used; this makes it one line now."""
    if name not in flags.FLAGS or flags.FLAGS[name].value is None:
        return
    config = flags.FLAGS[name].value
    if type(config).__name__ != '_ErrorConfig':
        return
    error = config._error  # pylint: disable=protected-access
    while error.__cause__ is not None:
        error = error.__cause__
    reason = next((line.strip() for line in reversed(str(error).splitlines())
                   if line.strip()), type(error).__name__)
    if not isinstance(error, OSError):
        reason = f'{type(error).__name__}: {reason}'
    sys.exit(f'error: --{name}={flags.FLAGS[name].config_filename}: cannot load this '
             f'config file ({reason}).')


def run(main, names=('config',)):
    """`app.run(main)` for a command with config files: help, quiet start-up, errors."""
    quiet_startup()
    app.run(main, flags_parser=lambda argv: parse_flags(argv, names))
