"""The machinery every converter shares: reading checkpoint files, name rules, shape checks.

Torch modules map to Flax modules by name rules; tensors by kind: a conv weight OIHW becomes a
kernel HWIO, BatchNorm `weight/bias` become `scale/bias` in `params` and
`running_mean/running_var` become `mean/var` in `batch_stats` (`num_batches_tracked` is dropped).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath
from flax import traverse_util

from pan_jax.convert import download

# A rule is (torch module pattern, flax module pattern); {X} stands for one name component.
Rules = tuple[tuple[str, str], ...]
# What `read_state_dict` takes: a file (local or gs://), a remote source ("hf-hub:OWNER/REPO",
# an http(s) URL; see `download`) or an in-memory state dict.
Source = str | os.PathLike | Mapping[str, Any]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# What `save_pretrained` (huggingface_hub's, used by SMP and timm) writes into its folder.
SAVED_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
# Training checkpoints wrap the state dict; the first of these keys holding a dict is unwrapped,
# whatever lies beside it (tensors too: pytorch/examples' ImageNet script saves `best_acc1` as one).
_WRAPPER_KEYS = ("state_dict", "model", "module")
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.")

_BN_TO_FLAX = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_CONV_TO_FLAX = {"weight": ("params", "kernel"), "bias": ("params", "bias")}


class ConversionError(ValueError):
    """A checkpoint does not fit the model: names the file, keys and shapes that do not."""


def source_name(source: Source) -> str:
    """How errors name a source: the file path, or "state dict" for one in memory."""
    return "state dict" if isinstance(source, Mapping) else os.fspath(source)


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like → numpy; floats of any width become float32."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # bf16/fp16 have no (or no exact) numpy twin
        value = value.numpy()
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
        array = array.astype(np.float32, copy=False)
    return array


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "detach") or isinstance(value, np.ndarray)


def _unwrap(obj: Any, name: str) -> dict[str, Any]:
    """The state dict inside a training checkpoint, without wrappers' key prefixes."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{name} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if _is_tensor(v)}
    if not tensors:
        raise ConversionError(
            f"{name} holds no tensors (top-level keys: {sorted(map(str, obj))[:12]}); expected a "
            f"state dict, possibly under one of {_WRAPPER_KEYS}"
        )
    # DataParallel/DDP ("module."), torch.compile ("_orig_mod.") and a Lightning module holding
    # the network as `self.model` ("model.") prefix every key, possibly nested.
    while prefix := next((p for p in _KEY_PREFIXES if all(k.startswith(p) for k in tensors)), None):
        tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


def _read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    import safetensors.numpy

    try:
        return safetensors.numpy.load(data)
    except (KeyError, TypeError):  # load raises KeyError, load_file TypeError
        # numpy has no bfloat16, so safetensors.numpy refuses BF16 files: read the (simple)
        # format directly: an 8-byte little-endian header length, a JSON header, the data.
        return _read_safetensors_raw(data)


def _read_safetensors_raw(data: bytes) -> dict[str, np.ndarray]:
    import ml_dtypes

    dtypes = {
        "BF16": ml_dtypes.bfloat16,
        "F16": np.float16,
        "F32": np.float32,
        "F64": np.float64,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = memoryview(data)[8 + length :]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=dtypes[info["dtype"]])
        out[key] = array.reshape(info["shape"])
    return out


def _file_format(suffix: str, name: str) -> str:
    if suffix.lower() == ".safetensors":
        return "safetensors"
    if suffix.lower() in TORCH_SUFFIXES:
        return "PyTorch (torch.save)"
    raise ConversionError(
        f"{name}: unknown checkpoint format {suffix!r}; expected .safetensors or one of "
        f"{', '.join(TORCH_SUFFIXES)}"
    )


def weights_file(path: epath.Path) -> epath.Path:
    """The weights file of a `save_pretrained` folder, or `path` itself when not a folder."""
    if not path.is_dir():
        return path
    for name in SAVED_WEIGHTS_FILES:
        if (path / name).exists():
            return path / name
    raise ConversionError(
        f"{path} is a folder without {' or '.join(SAVED_WEIGHTS_FILES)} (what save_pretrained "
        "writes): pass the weights file itself"
    )


def read_state_dict(source: Source) -> dict[str, np.ndarray]:
    """A checkpoint file or in-memory state dict → `{torch key: float32/int numpy array}`.

    `.safetensors` files are read with `safetensors.numpy` (no torch needed); `.pth`, `.pt`,
    `.bin`, `.ckpt` and `.tar` with `torch.load(weights_only=True)`. Training checkpoints that
    wrap the state dict under "state_dict", "model" or "module" are unwrapped, and DataParallel's
    `module.` prefix is removed. Paths may be local or gs://, files or `save_pretrained`
    folders (their model.safetensors or pytorch_model.bin); "hf-hub:OWNER/REPO[/FILE]" and
    http(s) URLs are downloaded into the local cache first (`download.fetch`). Raises
    ConversionError naming the file when it cannot be read (truncated, corrupt, of another
    format), `download.DownloadError` when it cannot be fetched.
    """
    name = source_name(source)
    if isinstance(source, Mapping):
        return {k: to_numpy(v) for k, v in _unwrap(source, name).items()}
    if download.is_remote(source):
        kind = _file_format(download.source_url(source)[1].suffix, name)  # before downloading
        path = epath.Path(download.fetch(source))
        name = f"{source} (cached as {path})"
    else:
        path = epath.Path(source)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {name} not found")
        path = weights_file(path)
        name = os.fspath(path)
        kind = _file_format(path.suffix, name)
    if kind != "safetensors":
        import torch  # only .pth and friends need torch

    data = path.read_bytes()
    # torch.save writes a zip archive (since torch 1.6) or a pickle (protocol 2+: 0x80 first).
    if kind != "safetensors" and not data.startswith((b"PK\x03\x04", b"\x80")):
        raise ConversionError(
            f"{name} is not a PyTorch checkpoint: torch.save writes a zip archive or a pickle, "
            f"this file starts with {data[:16]!r} ({len(data)} bytes)"
        )
    try:
        if kind == "safetensors":
            loaded: Any = _read_safetensors(data)
        else:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # each reader raises its own types for a damaged file
        if type(error).__name__ == "UnpicklingError" and "weights_only" in str(error):
            raise ConversionError(
                f"{name} holds Python objects besides tensors, which torch.load(weights_only="
                "True) refuses to unpickle (they could run code); re-save just the weights, "
                "for a file you trust: torch.save(torch.load(path, weights_only=False)"
                "['state_dict'], new_path) for a training checkpoint, or torch.save(torch.load("
                "path, weights_only=False).state_dict(), new_path) for a whole pickled model "
                f"({error})"
            ) from error
        raise ConversionError(
            f"cannot read {name} as a {kind} file ({len(data)} bytes): it is truncated, corrupt "
            f"or of another format ({type(error).__name__}: {error})"
        ) from error
    return {k: to_numpy(v) for k, v in _unwrap(loaded, name).items()}


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{[A-Z]\})", pattern)
    regex = "".join(
        f"(?P<{p[1]}>[A-Za-z0-9]+)" if re.fullmatch(r"\{[A-Z]\}", p) else re.escape(p)
        for p in parts
    )
    return re.compile(regex + "$")


def _translate(name: str, rules: Rules, source: int) -> str | None:
    for rule in rules:
        match = _pattern_regex(rule[source]).match(name)
        if match:
            return rule[1 - source].format(**match.groupdict())
    return None


def torch_to_flax(state_dict: Mapping[str, Any], rules: Rules) -> tuple[dict, list[str]]:
    """Converts a state dict by module `rules`; returns variables and the keys no rule took."""
    modules: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = value
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for module, leaves in modules.items():
        target = _translate(module, rules, 0)
        if target is None:
            unexpected.extend(f"{module}.{leaf}" for leaf in leaves)
            continue
        path = tuple(target.split("/"))
        is_bn = "running_mean" in leaves
        if not is_bn and np.ndim(leaves.get("weight")) == 1:  # no conv or linear: a norm layer
            raise ConversionError(
                f"{module}: a normalisation layer without running statistics (no "
                f"{module}.running_mean/running_var), e.g. GroupNorm: pan_jax's ResNets use "
                "BatchNorm, so this checkpoint cannot be converted"
            )
        table = _BN_TO_FLAX if is_bn else _CONV_TO_FLAX
        for leaf, value in leaves.items():
            if leaf == "num_batches_tracked":
                continue
            if leaf not in table:
                unexpected.append(f"{module}.{leaf}")
                continue
            array = to_numpy(value)
            if not is_bn and leaf == "weight":
                if array.ndim == 4:
                    array = array.transpose(2, 3, 1, 0)  # OIHW → HWIO
                elif array.ndim == 2:
                    array = array.T  # Linear (out, in) → Dense (in, out)
            collection, name = table[leaf]
            flat[(collection, *path, name)] = array
    return traverse_util.unflatten_dict(flat), unexpected


def _shown(items: list[str], limit: int = 12) -> str:
    more = f" … ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _params_first(name: str) -> tuple[bool, str]:
    # Kernels say more about a mismatch than BN statistics, which shadow them in plain order.
    return name.startswith("batch_stats/"), name


def check_against(
    variables: dict,
    template: dict,
    unexpected: list[str],
    source: str,
    header: str = "",
    limit: int = 12,
) -> None:
    """Raises ConversionError naming missing, unexpected and mis-shaped entries (`limit` of
    each kind, and their count).

    `template` holds anything with a `.shape` (arrays, `jax.ShapeDtypeStruct`); `header`, when
    given, is the first line of the message (e.g. what the checkpoint holds and what was wanted).
    """
    got = traverse_util.flatten_dict(variables, sep="/")
    want = traverse_util.flatten_dict(template, sep="/")
    missing = sorted(set(want) - set(got), key=_params_first)
    unexpected = sorted(unexpected + sorted(set(got) - set(want)), key=_params_first)
    mismatched = sorted(
        (
            f"{k}: checkpoint {tuple(np.shape(got[k]))}, model {tuple(want[k].shape)}"
            for k in set(got) & set(want)
            if tuple(np.shape(got[k])) != tuple(want[k].shape)
        ),
        key=_params_first,
    )
    if missing or unexpected or mismatched:
        lines = [header or f"{source} does not fit the model:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                lines.append(f"  {title}: {_shown(items, limit)}")
        raise ConversionError("\n".join(lines))


def flax_to_torch(variables: Mapping[str, Any], rules: Rules) -> dict[str, np.ndarray]:
    """Inverse of `torch_to_flax`: numpy arrays under torch key names (BN counters as 0)."""
    params = traverse_util.flatten_dict(dict(variables["params"]))
    stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
    out: dict[str, np.ndarray] = {}
    for path, value in params.items():
        module = _translate("/".join(path[:-1]), rules, 1)
        if module is None:
            raise ConversionError(f"no torch name for Flax parameter {'/'.join(path)}")
        array = np.asarray(value)
        is_bn = (*path[:-1], "mean") in stats
        if is_bn:
            out[f"{module}.{'weight' if path[-1] == 'scale' else 'bias'}"] = array
            out[f"{module}.running_mean"] = np.asarray(stats[(*path[:-1], "mean")])
            out[f"{module}.running_var"] = np.asarray(stats[(*path[:-1], "var")])
            out[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
        elif path[-1] == "kernel":
            out[f"{module}.weight"] = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
        else:
            out[f"{module}.bias"] = array
    return out
