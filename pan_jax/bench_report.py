"""What `python -m pan_jax.bench` measured, as tables: the console table, the goals of
docs/benchmarks.md next to the figures, and markdown for that file.

    python -m pan_jax.bench_report OUT/bench.json [OUT2/bench.json ...]

reads `bench --json` files or the merged `bench.json` of `launch/bench_gpu.sh` (one report
per part, all from one device call; a second call on the same machine can be added) and prints
the figures, the ratios and the goals in markdown.
The goals are targets to report against, never test assertions.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

OURS = "pan_jax"  # our rows' impl: "pan_jax MODEL"; the peers': "smp torch eager|compile"
PEER_NAMES = {"smp torch eager": "torch eager", "smp torch compile": "torch.compile"}


def measured(row: dict) -> bool:
    return "error" not in row and "skipped" not in row


class Ratio(NamedTuple):
    ours: dict
    peer: dict
    ratio: float
    unequal_dtypes: str  # "" where both ran in one dtype


def _our_rows(reports: Sequence[dict]) -> dict[tuple[str, str, Any], dict]:
    """Our measured rows by (impl, step, batch), each with its report's model and compute
    dtype: the first where several reports hold one setting (an A/B part's baseline repeats
    the smp part's row)."""
    rows: dict[tuple[str, str, Any], dict] = {}
    for report in reports:
        for r in report["results"]:
            if r["impl"].startswith(OURS) and measured(r):
                args = report["args"]
                row = {**r, "model": args["model"], "dtype": args["dtype"]}
                rows.setdefault((r["impl"], r["what"], r["batch"]), row)
    return rows


def _pair(reports: Sequence[dict]) -> list[Ratio]:
    """Our `pan_smp` rows over each peer's at the same step and batch, across `reports`.
    Another model's ratio would compare two networks."""
    ours: dict[tuple[str, Any], dict] = {}
    for (_, what, batch), r in _our_rows(reports).items():
        if r["model"] == "pan_smp":
            ours.setdefault((what, batch), r)
    out = []
    for report in reports:
        for peer in report["results"]:
            mine = ours.get((peer["what"], peer["batch"]))
            if peer["impl"] in PEER_NAMES and measured(peer) and mine:
                peer_dtype = peer.get("dtype", "")
                # On CPUs the peer stays float32: a bfloat16 run of ours is not its equal.
                unequal = (
                    ""
                    if peer_dtype.startswith(mine["dtype"])
                    else f"ours {mine['dtype']}, the peer {peer_dtype}"
                )
                ratio = mine["images_per_s"] / peer["images_per_s"]
                out.append(Ratio(mine, peer, ratio, unequal))
    return out


def ratios(report: dict) -> list[Ratio]:
    """Ours over each peer at the same step and batch, for `pan_smp` only."""
    return _pair([report])


def print_table(report: dict) -> None:
    """The console table of one bench run, its ratios and its largest-batch estimates."""
    print(
        f"\nmachine: {report['machine']}  MFU against {report['peak_tflops']:.3g} TFLOP/s "
        f"({report['peak_source']})"
    )
    header = (
        "impl",
        "what",
        "batch",
        "img/s",
        "step ms",
        "compile s",
        "GFLOP/img",
        "MFU",
        "mem GB",
    )
    widths = (-24, -9, 6, 10, 10, 11, 11, 7, 8)
    print(
        "".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths, strict=True))
    )
    for r in report["results"]:
        if not measured(r):
            why = f"error: {r['error'][:80]}" if "error" in r else f"skipped: {r['skipped']}"
            print(f"{r['impl']:<24}{r['what']:<9}{r['batch']:>6}  {why}")
            continue
        print(
            f"{r['impl']:<24}{r['what']:<9}{r['batch']:>6}{r['images_per_s']:>10.1f}"
            f"{r['step_s'] * 1e3:>10.1f}"
            f"{r['compile_s']:>11.1f}{r.get('flops_per_image', math.nan) / 1e9:>11.1f}"
            f"{r.get('mfu', math.nan):>7.1%}{r.get('peak_memory_gb', math.nan):>8.2f}"
        )
    print(
        "mem GB: ours the device's high-water mark so far in this process (never reset: it "
        "holds earlier rows), the peer's its own row's peak"
    )
    devices = report["machine"]["device_count"]
    on = f" (pan_jax on {devices} devices, the peer on one)" if devices > 1 else ""
    for r in ratios(report):
        setting = f"{r.peer['what']}, batch {r.peer['batch']}"
        unequal = f" ({r.unequal_dtypes})" if r.unequal_dtypes else ""
        print(f"ratio pan_jax / {r.peer['impl']} ({setting}): {r.ratio:.2f}x{on}{unequal}")
    each = " per device" if devices > 1 else ""  # the state replicated, the batch split
    for r in report["results"]:
        if r.get("largest_batch_estimate") is not None:
            print(
                f"{r['impl']} {r['what']}: XLA plans {r['compiled_peak_gb']:.2f} GB{each} for "
                f"batch {r['batch']}; the largest batch in {r['device_memory_gb']:.1f} GB{each} "
                f"is about {r['largest_batch_estimate']}"
            )
    sys.stdout.flush()


class Goal(NamedTuple):
    goal: str
    figure: str  # what was measured, or "not measured"
    status: str  # "met", "missed" or "not measured"


def _status(values: Sequence[bool]) -> str:
    if not values:
        return "not measured"
    return "met" if all(values) else "missed"


# The bench's A/Bs of an alternative lowering, and our default of each.
_VARIANT_DEFAULTS = (("bn_moments", "one_pass"), ("pointwise_conv", "matmul"))


def _variants(args: dict) -> list[str]:
    """The A/B options a report ran with, as flags ([] for our default lowering)."""
    return [
        f"`--{name}={args[name]}`"
        for name, default in _VARIANT_DEFAULTS
        if args.get(name, default) != default
    ]


def _default_variant(report: dict) -> bool:
    return not _variants(report["args"])


def paired_ratios(reports: Sequence[dict]) -> list[Ratio]:
    """`ratios` across the parts of one launch/bench_gpu.sh call: a peer measured in one part
    (`--nojax`) pairs with our `pan_smp` row of another. The A/B parts are left out."""
    reports = [r for r in reports if _default_variant(r)]
    return _pair(reports) if reports else []


def goals(reports: Sequence[dict]) -> list[Goal]:
    """Issue 7's goals for the figures of `reports` (runs on one machine, as the parts of one
    launch/bench_gpu.sh call): on a GPU, `pan_smp` training ≥ 1.5× SMP eager and ≥ 1.0×
    torch.compile, MFU ≥ 50% of the measured matmul rate, compile ≤ 60 s; on a CPU, the forward
    pass at least as fast as PyTorch."""
    reports = [r for r in reports if _default_variant(r)]
    if not reports:
        return []
    pairs = _pair(reports)

    def versus(peer: str, what: str, at_least: float) -> Goal:
        found = [p for p in pairs if p.peer["impl"] == peer and p.peer["what"] == what]
        figure = "; ".join(
            f"{p.ratio:.2f}× ({p.ours['images_per_s']:.1f} against {p.peer['images_per_s']:.1f} "
            f"img/s, batch {p.peer['batch']}"
            + (f", {p.unequal_dtypes})" if p.unequal_dtypes else ")")
            for p in found
        )
        step = "training" if what == "train" else "forward"
        name = f"`pan_smp` {step} ≥ {at_least:.1f}× SMP {PEER_NAMES[peer]}"
        return Goal(name, figure or "not measured", _status([p.ratio >= at_least for p in found]))

    if reports[0]["machine"]["jax_device"].startswith("cpu"):
        return [
            versus("smp torch eager", "forward", 1.0),
            versus("smp torch compile", "forward", 1.0),
        ]
    trains = [r for (_, what, _), r in _our_rows(reports).items() if what == "train"]
    with_mfu = [r for r in trains if math.isfinite(r.get("mfu", math.nan))]
    mfu = "; ".join(
        f"{r['mfu']:.1%} ({r['impl'].split()[1]}, batch {r['batch']})" for r in with_mfu
    )
    compile_s = "; ".join(
        f"{r['compile_s']:.1f} s ({r['impl'].split()[1]}, batch {r['batch']})" for r in trains
    )
    dtype = reports[0]["args"]["dtype"]
    return [
        versus("smp torch eager", "train", 1.5),
        versus("smp torch compile", "train", 1.0),
        Goal(
            f"MFU ≥ 50% of the measured {dtype} matmul rate",
            mfu or "not measured",
            _status([r["mfu"] >= 0.5 for r in with_mfu]),
        ),
        Goal(
            "train step compile ≤ 60 s",
            compile_s or "not measured",
            _status([r["compile_s"] <= 60 for r in trains]),
        ),
    ]


def print_goals(reports: Sequence[dict]) -> None:
    for goal in goals(reports):
        figure = "" if goal.status == "not measured" else f" ({goal.figure})"
        print(f"goal: {goal.goal}: {goal.status}{figure}")
    sys.stdout.flush()


def _label(row: dict, args: dict) -> str:
    short = args["backbone"].replace("resnet", "R")
    if row["impl"].startswith(OURS):
        return ", ".join([f"pan_jax `{row['impl'].split()[1]}` {short}", *_variants(args)])
    return f"SMP PAN {short}, {PEER_NAMES.get(row['impl'], row['impl'])}"


def markdown(reports: Sequence[dict]) -> str:
    """The figures and goals of `reports` as docs/benchmarks.md tables them."""
    lines = []
    machines = {json.dumps(r["machine"], sort_keys=True): r["machine"] for r in reports}
    for machine in machines.values():
        lines.append(
            f"Machine: {machine['jax_device']} ×{machine['device_count']}, jax {machine['jax']}, "
            f"Python {machine['python']}, {machine['cpu']} ({machine['cpu_count']} cores), "
            f"{machine['date']}."
        )
    # A --nojax part (the torch.compile peer) is given a dummy --peak_tflops.
    peaks = sorted(
        {f"{r['peak_tflops']:.3g}" for r in reports if r["peak_source"] != "--peak_tflops"}
    )
    if peaks:
        lines.append(f"Measured matmul rate (MFU's denominator): {', '.join(peaks)} TFLOP/s.")
    lines += [
        "",
        "| implementation | step | batch | img/s | step ms | time to first step | MFU "
        "| peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        for r in report["results"]:
            label, what, batch = _label(r, report["args"]), r["what"], r["batch"]
            if "largest_batch_from" in r:
                batch = f"{batch} (largest)"
            if not measured(r):
                # XLA's out-of-memory errors hold newlines and '|'.
                why = " ".join(str(r.get("error") or r.get("skipped")).split())
                why = why.replace("|", "\\|")
                lines.append(f"| {label} | {what} | {batch} | {why} | | | | |")
                continue
            first = f"{r['compile_s']:.1f} s" + (" (compile)" if r["impl"].startswith(OURS) else "")
            mfu = f"{r['mfu']:.1%}" if math.isfinite(r.get("mfu", math.nan)) else ""
            memory = r.get("peak_memory_gb", math.nan)
            memory = f"{memory:.2f} GB" if math.isfinite(memory) else ""
            lines.append(
                f"| {label} | {what} | {batch} | {r['images_per_s']:.1f} | "
                f"{r['step_s'] * 1e3:.1f} | {first} | {mfu} | {memory} |"
            )
    for ratio in paired_ratios(reports):
        peer = PEER_NAMES[ratio.peer["impl"]]
        lines.append(
            f"| **ratio pan_jax / {peer}** | {ratio.peer['what']} | {ratio.peer['batch']} | "
            f"**{ratio.ratio:.2f}×** | | | | |"
        )
    lines += _variant_ratios(reports)
    for report in reports:
        if "train_init_s" in report:
            on_devices = report.get("train_init_on_devices_s")
            lines.append(
                f"\nA training run's initialisation of `{report['args']['model']}` "
                f"(`train.create_state`): {report['train_init_s']:.1f} s"
                + (f"; on the devices instead: {on_devices:.1f} s." if on_devices else ".")
            )
    lines += ["", "| goal | figure | status |", "|---|---|---|"]
    lines += [f"| {g.goal} | {g.figure} | {g.status} |" for g in goals(reports)]
    return "\n".join(lines) + "\n"


def _variant_ratios(reports: Sequence[dict]) -> list[str]:
    """Each A/B row against our default row of the same model, step and batch."""
    default = _our_rows([report for report in reports if _default_variant(report)])
    lines = []
    for report in reports:
        if _default_variant(report):
            continue
        variant = ", ".join(_variants(report["args"]))
        for r in report["results"]:
            base = default.get((r["impl"], r["what"], r["batch"]))
            if base and measured(r):
                ratio = r["images_per_s"] / base["images_per_s"]
                lines.append(
                    f"| **ratio {variant} / our default** | {r['what']} | {r['batch']} | "
                    f"**{ratio:.2f}×** | | | | |"
                )
    return lines


def load(path: str) -> list[dict]:
    """The reports of a `bench --json` file, or of launch/bench_gpu.sh's merged bench.json (in
    its parts' order; a part without results, such as a failed one, is left out)."""
    with open(path) as f:
        data = json.load(f)
    if "results" in data:
        return [data]
    return [report for report in data.values() if isinstance(report, dict) and "results" in report]


def main(argv: Sequence[str]) -> int:
    usage = f"usage: python -m pan_jax.bench_report BENCH_JSON...\n\n{__doc__}"
    if any(argument in ("-h", "--help") for argument in argv[1:]):
        print(usage)
        return 0
    if len(argv) < 2:
        print(usage, file=sys.stderr)
        return 2
    reports = []
    for path in argv[1:]:
        try:
            found = load(path)
        except (OSError, ValueError) as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            return 1
        if not found:
            print(f"error: {path}: no bench results in it", file=sys.stderr)
            return 1
        reports += found
    print(markdown(reports), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
