"""The PyTorch side of `bam_jax.export`: .pth files to and from safetensors.

  python -m bam_jax.export_torch save TENSORS.safetensors OUT.pth bare|wrap
  python -m bam_jax.export_torch load CHECKPOINT.pth OUT.safetensors

`save` writes a safetensors file's tensors as a torch state dict (`wrap`: as
`{'model': state_dict}`, the official checkpoint layout). `load` reads a state dict, an
official checkpoint (`{'model': ...}`, `{'state_dict': ...}`) or a bare one, writes its
tensors as safetensors (bfloat16 as float32, which NumPy lacks) and prints
`{"args": ...}`: the simple values of the official run's `args` (its architecture), or
null. A bad file is one line on stderr and exit status 1.

`bam_jax.export` runs this in a child process, and it never imports JAX or TensorFlow: a
process that imported TensorFlow crashes when it then imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from safetensors.torch import load_file, save_file

SIMPLE = (str, int, float, bool, type(None))


class TorchFileError(ValueError):
    """A file that is not a readable PyTorch state dict; the message names it."""


def save(source: str, target: str, wrap: bool):
    """safetensors → a .pth state dict, optionally as {'model': state_dict}."""
    state_dict = load_file(source)
    torch.save({'model': state_dict} if wrap else state_dict, target)


def load(source: str, target: str) -> dict:
    """A .pth checkpoint's tensors → safetensors; returns {'args': official args or None}."""
    torch.serialization.add_safe_globals([argparse.Namespace])  # official `args`
    try:
        checkpoint = torch.load(source, map_location='cpu', weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike
        raise TorchFileError(f'{source} is not a readable PyTorch checkpoint: '
                             f'{str(error).splitlines()[0]}') from error
    args = None
    if isinstance(checkpoint, dict):
        for key in ('model', 'state_dict'):
            if isinstance(checkpoint.get(key), dict):
                args = checkpoint.get('args')
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        raise TorchFileError(f'{source} holds a {type(checkpoint).__name__}, '
                             'not a state dict')
    tensors = {key: value.detach().to(torch.float32 if value.dtype == torch.bfloat16
                                       else value.dtype).contiguous().clone()
               for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise TorchFileError(f'{source} holds no tensors')
    save_file(tensors, target)
    if isinstance(args, argparse.Namespace):
        return {'args': {key: value for key, value in vars(args).items()
                         if isinstance(value, SIMPLE)}}
    return {'args': None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bam_jax.export_torch',
                                     description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    save_command = commands.add_parser('save')
    save_command.add_argument('source')
    save_command.add_argument('target')
    save_command.add_argument('layout', choices=('bare', 'wrap'))
    load_command = commands.add_parser('load')
    load_command.add_argument('source')
    load_command.add_argument('target')
    args = parser.parse_args(argv)
    try:
        if args.command == 'save':
            save(args.source, args.target, wrap=args.layout == 'wrap')
        else:
            print(json.dumps(load(args.source, args.target)))
    except TorchFileError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    from bam_jax import lifetime
    lifetime.end_with_parent()  # a killed export leaves no torch process behind
    sys.exit(main())
