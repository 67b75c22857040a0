"""Where the time of a compiled step goes: a `jax.profiler` trace reduced to a table of XLA ops.

    report = op_profile.profile(run_one_step, compiled.as_text(), "prof/train", steps=3)
    print(op_profile.format_report(report))

The trace stays in the directory for TensorBoard's profile plugin or Perfetto; with the compiled
module's text beside it (`hlo.txt`, as `pan_jax.bench --profile_dir` writes it) the table can be
made again elsewhere: `python -m pan_jax.op_profile TRACE [--hlo=FILE] [--steps=3] [--top=40]`
(TRACE: such a directory or an `.xplane.pb` file, either file gzipped or not). The report sums
the time of every executed HLO instruction over the traced steps and names, for each, its kind
(convolution, matmul, elementwise or reduction fusion, copy, collective) and the Flax module it
came from (`backbone/layer3_4`, `decoder/fpa`; "bwd" marks the backward pass), read from the
compiled HLO's metadata. On GPUs and TPUs the times are the device's kernels; on CPUs the
thunks, which may run concurrently, so shares are of the summed op time, not of wall time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
from etils import epath

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_FUSION_KIND = re.compile(r"kind=k(\w+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_DEDUPLICATED = re.compile(r'deduplicated_name="([^"]*)"')
HLO_FILE = "hlo.txt"  # the compiled module's text, beside a trace that `pan_jax.bench` writes
# XLA:GPU replays runs of thunks as CUDA graphs; their kernels are tagged with the graph's thunk
# (`command_buffer_N`), so they are named by the kernel: XLA's own kernels after their fusion
# (`loop_add_fusion_3` runs `loop_add_fusion.3`), library kernels (cuBLAS, cuDNN) by the library.
_COMMAND_BUFFER = "command_buffer"
_KERNEL_SUFFIX = re.compile(r"_(\d+)$")
_LIBRARY_KERNELS = (  # (pattern, category) for kernels not named after an instruction, in order:
    # cuDNN's convolutions are implicit GEMMs (`sm90_xmma_fprop_implicit_gemm_...`).
    (re.compile(r"fprop|dgrad|wgrad|implicit|conv(?!ert)"), "convolution"),
    (re.compile(r"nvjet|gemm|cublas|cutlass"), "matmul"),
    (re.compile(r"memcpy|memset"), "copy/transpose"),
)
_CONVOLUTION = re.compile(r"conv(?!ert)")  # not `convert`, XLA's type conversions
_WRAPPER = re.compile(r"^(?:jit|pjit|jvp|transpose|vmap|remat|checkpoint|custom_jvp_call)\(")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines (ENTRY included, under its own name)."""
    bodies: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            current = bodies.setdefault(header.lstrip("%"), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and _INSTRUCTION.match(line):
            current.append(line)
    return bodies


def _category(name: str, definition: str, body: list[str]) -> str:
    """The kind of work an HLO instruction does, from its line and the computation it calls."""
    target = _CUSTOM_TARGET.search(definition)
    code = " ".join([definition, *body])
    text = (target.group(1) if target else name).lower()
    if _CONVOLUTION.search(text) or " convolution(" in code:
        return "convolution"
    if any(word in text for word in ("gemm", "matmul", "cublas")) or " dot(" in code:
        return "matmul"
    if any(word in name for word in ("all-reduce", "all-gather", "reduce-scatter")):
        return "collective"
    if " reduce(" in code or " reduce-window(" in code:
        return "reduction"
    if name.startswith(("copy", "transpose")) or " copy(" in definition:
        return "copy/transpose"
    if " fusion(" in definition:
        kind = _FUSION_KIND.search(definition)
        return "reduction" if kind and kind.group(1) == "Input" else "elementwise fusion"
    return "other"


def _scope(op_name: str, depth: int = 2) -> str:
    """`jit(step)/transpose(jvp(Model))/backbone/layer3_1/bn1/mul` -> `bwd backbone/layer3_1`."""
    backward = "transpose(" in op_name
    modules = [part for part in op_name.split("/") if part and not _WRAPPER.match(part)]
    if modules and modules[0][:1].isupper():  # the top module's class name, outside jvp(...)
        modules = modules[1:]
    path = "/".join(modules[:-1][:depth]) or "(step)"  # the last part is the primitive
    return f"bwd {path}" if backward else path


def _shared_scope(scopes: set[str]) -> str:
    """{`bwd backbone/layer3_1`, `bwd backbone/layer3_7`} -> `bwd backbone/layer3_*`."""
    backward = {scope.startswith("bwd ") for scope in scopes}
    paths = [scope.removeprefix("bwd ").split("/") for scope in scopes]
    shared = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) == 1:
            shared.append(parts[0])
            continue
        stems = {part.rsplit("_", 1)[0] for part in parts}
        shared.append(f"{stems.pop()}_*" if len(stems) == 1 else "*")
        break
    prefix = "fwd+bwd " if len(backward) > 1 else "bwd " if backward.pop() else ""
    return prefix + ("/".join(shared) or "*")


def instruction_info(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (category, module scope), from a compiled module's text.

    A fusion is classified by what it calls (a library fusion of a convolution is a
    convolution) and, when its own line has no metadata, scoped by its body's. Fusions that XLA
    deduplicated (one kernel for identical fusions, e.g. of every block of a ResNet stage) share
    their scopes' common part (`bwd backbone/layer3_*`): a trace names the kernel, not which
    of them ran.
    """
    bodies = _computations(hlo_text)
    info = {}
    kernels: dict[str, list[str]] = collections.defaultdict(list)  # kernel -> instructions
    for lines in bodies.values():
        for line in lines:
            name, definition = _INSTRUCTION.match(line).groups()
            if " parameter(" in definition:
                continue
            called = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", definition)
            body = [inner for callee in called for inner in bodies.get(callee, [])]
            op_names = _OP_NAME.findall(definition) or [
                found for inner in body for found in _OP_NAME.findall(inner)
            ]
            scopes = collections.Counter(_scope(op) for op in op_names)
            if scopes:
                scope = scopes.most_common(1)[0][0]
            else:  # e.g. a weight-gradient convolution: scoped by the operands it reads,
                # preferring the backward pass's (it also reads forward activations).
                operands = [info[o][1] for o in _OPERAND.findall(definition) if o in info]
                scope = min(
                    (s for s in operands if s != "(step)"),
                    key=lambda s: not s.startswith("bwd "),
                    default="(step)",
                )
            info[name] = (_category(name, definition, body), scope)
            deduplicated = _DEDUPLICATED.search(definition)
            kernels[deduplicated.group(1) if deduplicated else name].append(name)
    for names in kernels.values():
        scopes = {info[name][1] for name in names}
        if len(scopes) > 1:
            shared = _shared_scope(scopes)
            for name in names:
                info[name] = (info[name][0], shared)
    return info


def _read(path: epath.Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def op_times(trace: str) -> dict[str, float]:
    """Seconds per executed HLO instruction in the newest trace under the directory `trace`
    (local or gs://: a training run's workdir may be a bucket), or in one `.xplane.pb[.gz]`."""
    path = epath.Path(trace)
    if path.is_file():
        paths = [path]
    else:  # jax.profiler writes DIR/plugins/profile/<YYYY_MM_DD_HH_MM_SS>/<host>.xplane.pb
        pattern = "plugins/profile/*/*.xplane.pb"
        paths = sorted(path.glob(pattern), key=lambda p: p.parent.name)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb trace under {trace}")
    data = jax.profiler.ProfileData.from_serialized_xspace(_read(paths[-1]))
    planes = list(data.planes)
    # Accelerator kernels when there are any; the host's thunks otherwise (XLA:CPU). Host events
    # of an accelerator run only launch the kernels, so they would count the work twice.
    device = [p for p in planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in device or [p for p in planes if p.name.startswith("/host:CPU")]:
        lines = list(plane.lines)
        # TPUs (and derived GPU traces) have one line of XLA ops; raw GPU and CPU traces tag
        # each kernel or thunk with the `hlo_op` it runs. A device event without the tag (a
        # memcpy, say) is still device time: it counts under its own name.
        xla_ops = [line for line in lines if line.name == "XLA Ops"]
        for line in xla_ops or lines:
            if line.name == "XLA Modules":
                continue
            for event in line.events:
                op = event.name if xla_ops else dict(event.stats or ()).get("hlo_op")
                if (not op and device) or str(op).startswith(_COMMAND_BUFFER):
                    op = event.name  # the kernel: `summarize` maps it to its instruction
                if op:
                    totals[str(op)] += event.duration_ns * 1e-9
    return dict(totals)


def _instruction_name(name: str, info: dict[str, tuple[str, str]]) -> str:
    """A traced op or kernel name -> the HLO instruction it ran, where the name tells."""
    if name in info:
        return name
    dotted = _KERNEL_SUFFIX.sub(r".\1", name)
    return dotted if dotted in info else name


def _kernel_category(kernel: str) -> str:
    """The kind of work of a kernel not named after an HLO instruction (a library's)."""
    lowered = kernel.lower()
    for pattern, category in _LIBRARY_KERNELS:
        if pattern.search(lowered):
            return category
    return _category(kernel, "", [])


def profile(
    run_step: Callable[[], Any], hlo_text: str, directory: str, steps: int = 3
) -> dict[str, Any]:
    """Traces `steps` calls of `run_step` (each must block until done) and reduces the trace
    (`summarize`). `hlo_text` is kept beside the trace (`HLO_FILE`), so that the table can be
    made again elsewhere (`main`)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, HLO_FILE), "w") as f:
        f.write(hlo_text)
    with jax.profiler.trace(directory):
        for _ in range(steps):
            run_step()
    return summarize(directory, hlo_text, steps)


def summarize(trace: str, hlo_text: str, steps: int) -> dict[str, Any]:
    """The trace (`op_times`) of `steps` runs of the program `hlo_text`, as a table.

    Returns {"steps", "ops": [{name, category, scope, ms_per_step, share}] (longest first),
    "categories": {category: share}, "scopes": {scope: share}, "trace_dir"}.
    """
    info = instruction_info(hlo_text)
    times: dict[str, float] = collections.Counter()
    for name, seconds in op_times(trace).items():
        times[_instruction_name(name, info)] += seconds
    total = sum(times.values()) or 1.0
    ops, categories, scopes = [], collections.Counter(), collections.Counter()
    for name, seconds in sorted(times.items(), key=lambda item: -item[1]):
        category, scope = info.get(name) or (_kernel_category(name), "(unmapped kernel)")
        ops.append(
            {
                "name": name,
                "category": category,
                "scope": scope,
                "ms_per_step": seconds / steps * 1e3,
                "share": seconds / total,
            }
        )
        categories[category] += seconds / total
        scopes[scope] += seconds / total
    return {
        "steps": steps,
        "op_ms_per_step": total / steps * 1e3,
        "ops": ops,
        "categories": dict(categories.most_common()),
        "scopes": dict(scopes.most_common()),
        "trace_dir": trace,
    }


def format_report(report: dict[str, Any], top: int = 15) -> str:
    """The report as text: time by kind of op, by module, and the longest ops."""
    lines = [f"summed XLA op time: {report['op_ms_per_step']:.1f} ms per step"]
    lines.append("by kind:   " + ", ".join(f"{k} {v:.0%}" for k, v in report["categories"].items()))
    scopes = list(report["scopes"].items())[:top]
    lines.append("by module: " + ", ".join(f"{k} {v:.0%}" for k, v in scopes))
    lines.append(f"{'op':<40}{'kind':<20}{'module':<30}{'ms/step':>9}{'share':>7}")
    for op in report["ops"][:top]:
        lines.append(
            f"{op['name'][:39]:<40}{op['category']:<20}{op['scope'][:29]:<30}"
            f"{op['ms_per_step']:>9.2f}{op['share']:>7.1%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pan_jax.op_profile",
        description="Where a traced step's time goes, from its trace and compiled HLO text.",
    )
    parser.add_argument("trace", help="a profile directory or an .xplane.pb[.gz] file")
    parser.add_argument("--hlo", help=f"the compiled module's text [.gz]; default TRACE/{HLO_FILE}")
    parser.add_argument("--steps", type=int, default=3, help="steps in the trace (default 3)")
    parser.add_argument("--top", type=int, default=40, help="longest ops to list (default 40)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps}: expected the number of steps traced, at least 1")
    hlo = epath.Path(args.hlo or os.path.join(args.trace, HLO_FILE))
    if not hlo.exists():
        parser.error(f"{hlo} not found: pass the compiled module's text with --hlo")
    try:
        report = summarize(args.trace, _read(hlo).decode(), args.steps)
    except FileNotFoundError as error:
        parser.error(str(error))
    except RuntimeError as error:  # XLA's "Failed to parse XSpace"
        parser.error(f"{args.trace}: not a jax.profiler trace ({error})")
    unmapped = sum(op["share"] for op in report["ops"] if op["scope"] == "(unmapped kernel)")
    if report["ops"] and unmapped > 0.5:
        print(
            f"warning: {unmapped:.0%} of the op time is in kernels {hlo} does not name: is it "
            "the HLO of the program traced?",
            file=sys.stderr,
        )
    print(format_report(report, top=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
