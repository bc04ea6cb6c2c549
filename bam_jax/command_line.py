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
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable

import ml_collections
from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_dict import placeholder
from ml_collections.config_flags import config_path

from bam_jax import lifetime

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


def skip_absent_tpu():
    """Drops JAX's TPU backend where libtpu is installed but the host has no TPU chip (a
    CPU host that compiles for TPUs, a GPU node): JAX would still start libtpu there,
    which prints six lines of failed TPU discovery at every command. On a TPU VM, and
    where JAX_PLATFORMS is set, nothing changes. Imports JAX; call it before JAX's
    backends start (the first `jax.devices()`)."""
    import importlib.util
    if os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None:
        return
    import dataclasses
    from jax._src import hardware_utils, xla_bridge  # pylint: disable=import-outside-toplevel
    factories = getattr(xla_bridge, '_backend_factories', {})
    if 'tpu' in factories and hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        # The platform stays known (lowering rules name it); it just has no devices here.
        factories['tpu'] = dataclasses.replace(factories['tpu'], factory=lambda: None)


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
        config = _ConfigFileParser(name).parse(config_file)
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


def config_from_json(tree) -> ml_collections.ConfigDict:
    """A resolved config (a workdir's `config.json`, or the run config an export keeps
    beside its weights) as a config file gives it: JSON's lists back to tuples, and its
    nulls to optional strings (the shipped configs' only unset keys, `data.data_dir` and
    `knn.train_split`), so that `--config.<key>` overrides it like a `configs/*.py`."""
    def typed(value):
        if isinstance(value, dict):
            return {key: typed(item) for key, item in value.items()}
        if isinstance(value, list):
            return tuple(typed(item) for item in value)
        return placeholder(str) if value is None else value
    return ml_collections.ConfigDict(typed(tree))


class _ConfigFileParser(config_flags.config_flags.ConfigFileFlagParser):
    """ml_collections' config file parser that also reads a `config.json`."""

    def parse(self, path):
        if not str(path).endswith('.json'):
            return super().parse(path)
        try:
            with open(path) as file:
                tree = json.load(file)
        except (OSError, ValueError) as error:
            return config_flags.config_flags._ErrorConfig(  # pylint: disable=protected-access
                OSError(f'{error}'))
        config = config_from_json(tree)
        if self._lock_config:
            config.lock()
        return config


def define_config_file(name: str, default: str | None, help_string: str):
    """`config_flags.DEFINE_config_file(..., lock_config=True)` that also takes a
    workdir's `config.json`, listed by `--help`; exits on a bad override."""
    try:  # With a default file, overrides are applied here already.
        holder = flags.DEFINE_flag(config_flags.config_flags._ConfigFlag(  # pylint: disable=protected-access
            parser=_ConfigFileParser(name=name, lock_config=True),
            serializer=flags.ArgumentSerializer(), name=name, default=default,
            help_string=help_string, flag_values=flags.FLAGS))
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


def interrupted(outcome: str) -> int:
    """A command stopped by Ctrl-C: one line on stderr, and the shell's status for it."""
    print(f'Stopped by SIGINT; {outcome}.', file=sys.__stderr__, flush=True)
    return 128 + signal.SIGINT


class ExitOnInterrupt:
    """Ctrl-C ends the command at once: `cleanup()`, one line (`interrupted`), exit 130.

    A SIGINT handler that exits rather than a KeyboardInterrupt to catch: JAX has bare
    `except:` clauses on its dispatch path (`jax._src.core.is_constant_dim`,
    `jax._src.api._is_ref`), and a KeyboardInterrupt raised inside one is lost. In CI a
    linear probe once ran on for two minutes after its Ctrl-C. Install it in the main
    thread.
    """

    def __init__(self, outcome: str):
        self.outcome = outcome
        self.cleanup: Callable[[], None] = lambda: None
        self._pending: bool | None = None  # not None while `deferred`
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        if self._pending is not None:
            self._pending = True
            return
        self.cleanup()
        sys.stdout.flush()
        os._exit(interrupted(self.outcome))  # pylint: disable=protected-access

    @contextlib.contextmanager
    def deferred(self, outcome: str):
        """While the results are committed, a Ctrl-C waits; then it stops with `outcome`."""
        self._pending = False
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
        if pending:
            sys.stdout.flush()
            os._exit(interrupted(outcome))  # pylint: disable=protected-access


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
    """`app.run(main)` for a command with config files: help, quiet start-up, errors,
    Ctrl-C that reaches no child process (`lifetime.route_interrupts`)."""
    quiet_startup()
    lifetime.route_interrupts()
    app.run(main, flags_parser=lambda argv: parse_flags(argv, names))
