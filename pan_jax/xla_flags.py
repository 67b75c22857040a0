"""XLA:CPU settings that make PAN's convolutions faster on CPUs (laptops, Colab without a GPU).

XLA reads `XLA_FLAGS` once, when JAX first touches a device, so `use_fast_cpu_kernels()` must
run before that (the entry points call it first thing). It routes convolutions to oneDNN and
elementwise/reduction fusions to YNNPACK, which docs/benchmarks.md measures at 1.7× the forward
and 1.35× the training step of a PAN-ResNet-101 on a 2-core x86 machine. The flags touch only
the CPU compiler, so GPU and TPU runs are unaffected.

The flags are experimental, and XLA aborts on a flag it does not know, so they are added only
for jaxlib versions they were checked on, never over flags the user set, and not at all with
`PAN_JAX_FAST_CPU=0`.
"""

from __future__ import annotations

import os
from importlib import metadata

FAST_CPU_FLAGS = {
    "xla_cpu_experimental_onednn_custom_call": "true",
    "xla_cpu_experimental_ynn_fusion_type": "eltwise,reduce",
}
# jaxlib releases whose XLA knows FAST_CPU_FLAGS (0.10.0 and 0.10.2 were checked).
CHECKED_JAXLIB_SERIES = ("0.10.",)


def use_fast_cpu_kernels() -> bool:
    """Adds FAST_CPU_FLAGS to `XLA_FLAGS`; returns whether it did.

    A no-op with `PAN_JAX_FAST_CPU=0`, when `XLA_FLAGS` already sets one of the flags, or
    when the installed jaxlib is not of a checked series. Call it before any JAX computation.
    """
    if os.environ.get("PAN_JAX_FAST_CPU", "1") == "0":
        return False
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    if not version.startswith(CHECKED_JAXLIB_SERIES):
        return False
    current = os.environ.get("XLA_FLAGS", "")
    if any(name in current for name in FAST_CPU_FLAGS):
        return False
    added = " ".join(f"--{name}={value}" for name, value in FAST_CPU_FLAGS.items())
    os.environ["XLA_FLAGS"] = f"{current} {added}".strip()
    return True
