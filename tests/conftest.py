"""Shared test settings: full-precision float32 matmuls, so parity tests compare like with like;
the local stand-in for the Hugging Face Hub."""

import jax
import pytest

from tests.helpers import Hub

jax.config.update("jax_default_matmul_precision", "highest")


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
