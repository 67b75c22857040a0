"""Pretrained weights by name: downloaded once into a local cache, verified, then read as files.

    path = download.fetch("hf-hub:timm/resnet101s.gluon_in1k")  # its model.safetensors
    source = download.imagenet_source({"depth": 101, "stem": "deep64", "avg_down": False})

Sources are "hf-hub:OWNER/REPO" (the repository's `model.safetensors`, timm's convention),
"hf-hub:OWNER/REPO/FILE", and http(s):// URLs. Files land in `$PAN_JAX_CACHE_DIR/weights`
(default `~/.cache/pan_jax/weights`) through a temporary file that is renamed into place only
when complete and checked (the Hub's sha256, or the hash prefix torchvision-style file names
carry, and the announced size), so an interrupted or corrupt download never passes for a
finished one and a failed run deletes nothing. `HF_ENDPOINT` selects a Hub mirror as it does
for huggingface_hub.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from absl import logging

HF_PREFIX = "hf-hub:"
_HF_DEFAULT_FILE = "model.safetensors"
# torch.hub's convention: "resnet101-63fe2227.pth" carries a prefix of the file's sha256. Only
# trusted on the hosts that follow it: elsewhere "-20240101." may be a date.
_URL_HASH = re.compile(r"-([a-f0-9]{8,64})\.")
HASHED_NAME_HOSTS = {"download.pytorch.org", "github.com"}
_TIMEOUT_S = 60.0
_CHUNK = 1 << 20

# ImageNet weights for each backbone variant ((depth, stem, avg_down), models.ResNet's fields),
# all timm checkpoints on the Hugging Face Hub: torchvision's own for the 7×7 stem; Gluon's
# v1c/v1d/v1s for the deep stems (v1s = PSPNet's 64-64-128 stem, the paper's).
IMAGENET_WEIGHTS: dict[tuple[int, str, bool], str] = {
    **{(d, "torchvision", False): f"timm/resnet{d}.tv_in1k" for d in (18, 34, 50, 101, 152)},
    **{(d, "deep64", False): f"timm/resnet{d}s.gluon_in1k" for d in (50, 101, 152)},
    **{(d, "deep32", False): f"timm/resnet{d}c.gluon_in1k" for d in (50, 101, 152)},
    **{(d, "deep32", True): f"timm/resnet{d}d.ra2_in1k" for d in (18, 34)},
    **{(d, "deep32", True): f"timm/resnet{d}d.gluon_in1k" for d in (50, 101, 152)},
}
IMAGENET = "imagenet"  # what config.model.pretrained says to pick from IMAGENET_WEIGHTS


class DownloadError(RuntimeError):
    """A pretrained file could not be fetched or failed its check; names the source and URL."""


def is_remote(source: Any) -> bool:
    return isinstance(source, str) and source.startswith((HF_PREFIX, "http://", "https://"))


def imagenet_source(arch: dict[str, Any]) -> str:
    """The "hf-hub:" source of ImageNet weights for a backbone arch (depth, stem, avg_down)."""
    key = (int(arch["depth"]), arch["stem"], bool(arch.get("avg_down", False)))
    if key not in IMAGENET_WEIGHTS:
        known = ", ".join(
            f"resnet{d} stem {s}{' avg_down' if a else ''}" for d, s, a in sorted(IMAGENET_WEIGHTS)
        )
        raise ValueError(
            f"no ImageNet weights are known for a resnet{key[0]} with stem {key[1]!r}"
            f"{' and avg_down' if key[2] else ''}; known: {known}. Pass a weights file instead "
            "(config.model.pretrained=FILE) or train from scratch (config.model.pretrained='')"
        )
    return HF_PREFIX + IMAGENET_WEIGHTS[key]


def cache_dir() -> Path:
    root = os.environ.get("PAN_JAX_CACHE_DIR") or Path.home() / ".cache" / "pan_jax"
    return Path(root) / "weights"


def source_url(source: str) -> tuple[str, Path]:
    """(URL to download, path in the cache relative to `cache_dir()`) of a remote source."""
    if source.startswith(HF_PREFIX):
        parts = source.removeprefix(HF_PREFIX).strip("/").split("/")
        if len(parts) < 2 or any(part in ("", ".", "..") for part in parts):
            raise ValueError(
                f"{source!r}: expected hf-hub:OWNER/REPO or hf-hub:OWNER/REPO/FILE, e.g. "
                "hf-hub:timm/resnet101s.gluon_in1k"
            )
        repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or _HF_DEFAULT_FILE
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{repo}/resolve/main/{file}", Path("huggingface", repo, file)
    parsed = urllib.parse.urlparse(source)
    name = Path(parsed.path).name
    if not name or not parsed.hostname:
        raise ValueError(f"{source!r}: expected a URL that names a file, e.g. https://host/x.pth")
    # One folder per URL (path and query), so that two URLs of one name never share a file;
    # the host without credentials, so that no token lands in a cache path.
    folder = hashlib.sha256(source.encode()).hexdigest()[:16]
    return source, Path("urls", parsed.hostname, folder, name)


def fetch(source: str) -> Path:
    """The local path of a remote source, downloading it into the cache the first time."""
    url, relative = source_url(source)
    target = cache_dir() / relative
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{socket.gethostname()}-{os.getpid()}.partial")
    logging.info("downloading %s into %s", source, target)
    try:
        expected_sha256, expected_size = _announced(url)
        sha256, size, sent_size = _download(url, partial)
        problem = _check(url, sha256, size, (sent_size, expected_size), expected_sha256)
        if problem:
            raise DownloadError(f"{source}: the download from {url} is damaged: {problem}")
        # Atomic: readers see no file or the whole file. A file another process published
        # meanwhile is left alone (replacing it could break a reader on NFS).
        if not target.exists():
            os.replace(partial, target)
    except (OSError, http.client.HTTPException) as error:  # URLError is an OSError
        raise DownloadError(
            f"cannot download {source} from {url} ({_reason(error)}). Without access to it, "
            f"copy the file to {target} (or anywhere, and pass that path as the weights)"
        ) from error
    finally:
        partial.unlink(missing_ok=True)
    logging.info("downloaded %s: %.1f MB, sha256 %s", target, size / 1e6, sha256)
    return target


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the first hop's headers: the Hub announces hash and size there


def _announced(url: str) -> tuple[str | None, int | None]:
    """(sha256, size) the server states before redirecting to its storage, where it does."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=_TIMEOUT_S) as reply:
            headers = reply.headers
    except urllib.error.HTTPError as error:
        error.close()
        if error.code not in (301, 302, 303, 307, 308):
            return None, None  # no HEAD here, or an error the download itself will report
        headers = error.headers
    except (OSError, http.client.HTTPException):
        return None, None  # the download itself says what is wrong, or succeeds
    etag = headers.get("X-Linked-Etag") or headers.get("ETag") or ""
    etag = etag.removeprefix("W/").strip('"').lower()
    size = headers.get("X-Linked-Size")
    return (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None), (int(size) if size else None)


def _download(url: str, partial: Path) -> tuple[str, int, int]:
    """(sha256, bytes received, bytes the reply announced or 0) of a download into `partial`."""
    digest, size = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as reply, open(partial, "wb") as out:
        total = int(reply.headers.get("Content-Length") or 0)
        next_report = 0.1
        while chunk := reply.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            if total and size / total >= next_report:
                logging.info("  %3.0f%% of %.1f MB", 100 * size / total, total / 1e6)
                next_report += 0.1
    return digest.hexdigest(), size, total


def _check(
    url: str,
    sha256: str,
    size: int,
    expected_sizes: tuple[int | None, ...],
    expected_sha256: str | None,
) -> str:
    """What is wrong with a finished download, or ""."""
    for expected in expected_sizes:
        if expected and size != expected:
            return f"{size} bytes, the server announced {expected}"
    if expected_sha256 is not None and sha256 != expected_sha256:
        return f"sha256 {sha256}, the server announced {expected_sha256}"
    parsed = urllib.parse.urlparse(url)
    match = _URL_HASH.search(Path(parsed.path).name)
    if match and parsed.hostname in HASHED_NAME_HOSTS and not sha256.startswith(match.group(1)):
        return f"sha256 {sha256} does not start with {match.group(1)}, as its name says"
    return ""


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, http.client.IncompleteRead):
        return f"the connection closed after {len(error.partial)} bytes of the last read"
    return f"{type(error).__name__}: {error}"
