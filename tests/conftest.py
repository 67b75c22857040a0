"""Shared test settings: full-precision float32 matmuls, so parity tests compare like with like;
a compilation cache for the programs compiled in the test process; the local stand-in for the
Hugging Face Hub."""

import shutil
import tempfile

import jax
import pytest

from tests.helpers import Hub

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests train the same tiny model in this process: each run's jitted functions are new
# objects, so jax's in-memory cache misses and XLA compiled the same train step again (~8 s on
# 2 cores, a quarter of those tests' time). JAX's persistent cache keys on the program itself.
# Only tests that ask for it (`reuse_compiled_programs`) write entries: writing each one-off
# program of the model tests cost ~5%. One directory per xdist worker: JAX writes an entry
# without a temporary file, and another process could read it half written. Programs run by
# `python -m pan_jax.main` in a subprocess keep their workdir's own cache, as a user's run does.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="pan_jax_tests_compilation_cache_")
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
# JAX decides at the first compile whether this process uses the cache, and keeps to it: decided
# here, not by whichever test compiles first (bench.main turns the cache off for its process).
jax.jit(lambda x: x + 1)(0)


def pytest_unconfigure(config):
    shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture
def reuse_compiled_programs():
    """Programs compiled in the test are kept for later tests of this process."""
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local Hub that pretrained downloads go to, and an empty weights cache."""
    server = Hub()
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # 127.0.0.1 is reached directly
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("PAN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    yield server
    server.server.shutdown()
    server.server.server_close()
