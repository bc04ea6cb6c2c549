"""Test setup: 8 simulated CPU devices, set before JAX initialises.

Every multi-device path is tested on meshes built from subsets of these devices.
"""
import os

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8'])
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after the flags)
import pytest  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

assert jax.device_count() == 8, 'tests need 8 simulated devices; was JAX imported early?'


def data_mesh(n_devices: int) -> jax.sharding.Mesh:
    """A 1-D 'data' mesh over the first `n_devices` CPU devices."""
    return jax.make_mesh((n_devices,), ('data',), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n_devices])


@pytest.fixture(params=[1, 2, 4, 8], ids=lambda n: f'{n}dev')
def mesh(request):
    return data_mesh(request.param)
