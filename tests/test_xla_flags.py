"""`pan_jax.xla_flags`: the CPU kernels are on in this process, and never forced on a user."""

import os
from importlib import metadata

import pytest

from pan_jax import xla_flags

CHECKED = metadata.version("jaxlib").startswith(xla_flags.CHECKED_JAXLIB_SERIES)


@pytest.mark.skipif(not CHECKED, reason="jaxlib outside the checked series: flags stay off")
def test_tests_run_with_the_fast_cpu_kernels():
    # conftest turns them on as the entry points do; every parity test then checks them.
    for name, value in xla_flags.FAST_CPU_FLAGS.items():
        assert f"--{name}={value}" in os.environ["XLA_FLAGS"]


def test_adds_flags_after_existing_ones(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("PAN_JAX_FAST_CPU", raising=False)
    monkeypatch.setattr(xla_flags.metadata, "version", lambda _: "0.10.2")
    assert xla_flags.use_fast_cpu_kernels()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=8"
    assert set(flags[1:]) == {f"--{k}={v}" for k, v in xla_flags.FAST_CPU_FLAGS.items()}
    assert not xla_flags.use_fast_cpu_kernels()  # idempotent: nothing added twice
    assert len(os.environ["XLA_FLAGS"].split()) == 3


@pytest.mark.parametrize(
    "env, version",
    [
        ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}, "0.10.2"),  # user's own
        ({"XLA_FLAGS": "", "PAN_JAX_FAST_CPU": "0"}, "0.10.2"),  # opted out
        ({"XLA_FLAGS": ""}, "0.12.0"),  # unchecked jaxlib: an unknown flag would abort XLA
    ],
)
def test_leaves_xla_flags_alone(monkeypatch, env, version):
    monkeypatch.delenv("PAN_JAX_FAST_CPU", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(xla_flags.metadata, "version", lambda _: version)
    assert not xla_flags.use_fast_cpu_kernels()
    assert os.environ["XLA_FLAGS"] == env["XLA_FLAGS"]
