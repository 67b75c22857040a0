"""`python -m pan_jax.bench` end to end on a tiny setting, and the op profile it can print."""

import functools
import glob
import gzip
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from absl import flags

from pan_jax import bench, op_profile
from pan_jax import bench_report as tables
from pan_jax.models.layers import ConvBN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, "-m", "pan_jax.bench", "--model=pan_smp", "--backbone=resnet18",
        "--batch=2,max", "--crop=128", "--what=train,forward", "--peer=eager",
        "--steps=2", "--warmup=1", f"--json={out / 'bench.json'}",
        f"--profile_dir={out / 'profile'}", "--time_init",
    ]  # fmt: skip
    # A user's persistent compilation cache must not shorten the reported compile times.
    cache = out / "jax_cache"
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not cache.exists() or not any(cache.iterdir()), "bench used the compilation cache"
    return json.loads((out / "bench.json").read_text()), result.stdout


def test_bench_measures_ours_and_the_peer(bench_report):
    report, stdout = bench_report
    rows = {(r["impl"], r["what"]): r for r in report["results"] if r["batch"] == 2}
    assert set(rows) == {
        ("pan_jax pan_smp", "train"),
        ("pan_jax pan_smp", "forward"),
        ("smp torch eager", "train"),
        ("smp torch eager", "forward"),
    }
    for row in rows.values():
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["compile_s"] > 0
        assert row["images_per_s"] == pytest.approx(2 / row["step_s"])
    # XLA's FLOP count: backward ≈ 2× forward, so a train step is about 3× the forward pass.
    train, forward = rows[("pan_jax pan_smp", "train")], rows[("pan_jax pan_smp", "forward")]
    assert 2.5 < train["flops_per_image"] / forward["flops_per_image"] < 3.5
    assert report["machine"]["jax"] == jax.__version__
    assert report["train_init_s"] > 0  # --time_init: a training run's own initialisation
    # MFU for every row, ours and the peer's (same network, our FLOP count), against the
    # measured fp32 matmul rate of this CPU.
    assert report["peak_source"] == "float32 matmul" and report["peak_tflops"] > 0
    assert report["machine"]["cpu_count"] > 0
    for row in rows.values():  # the achieved rate over the peak; no upper bound: a busy
        # machine can slow the matmul probe more than the measured step (seen at 1.02)
        flops = rows[("pan_jax pan_smp", row["what"])]["flops_per_image"]  # same network
        achieved = flops * row["images_per_s"] / 1e12
        assert row["mfu"] == pytest.approx(achieved / report["peak_tflops"], rel=1e-6), row
    assert rows[("smp torch eager", "train")]["dtype"] == "float32"  # no autocast on a CPU
    assert report["args"]["dtype"] == "float32"  # --dtype=auto: ours likewise
    assert "ratio pan_jax / smp torch eager (train, batch 2)" in stdout
    assert "ratio pan_jax / smp torch eager (forward, batch 2)" in stdout
    # The goals of docs/benchmarks.md next to the figures: on a CPU, the forward pass.
    eager_goal = re.search(
        r"goal: `pan_smp` forward ≥ 1.0× SMP torch eager: (\w+) \((.*)\)", stdout
    )
    ours_ips = rows[("pan_jax pan_smp", "forward")]["images_per_s"]
    peer_ips = rows[("smp torch eager", "forward")]["images_per_s"]
    assert eager_goal.groups() == (
        "met" if ours_ips >= peer_ips else "missed",
        f"{ours_ips / peer_ips:.2f}× ({ours_ips:.1f} against {peer_ips:.1f} img/s, batch 2)",
    )
    assert "goal: `pan_smp` forward ≥ 1.0× SMP torch.compile: not measured\n" in stdout
    # XLA's memory plan of the train step holds the state; a CPU has no device memory limit to
    # fit a batch into (on GPUs the JSON and the table give the largest batch).
    assert train["compiled_peak_gb"] > train["state_gb"] > 0.04  # ResNet-18 PAN, fp32 + momentum
    assert "largest_batch_estimate" not in train
    # So --batch=2,max skips its last row, saying why (on a GPU it trains at the estimate).
    assert report["results"][-1] == {
        "impl": "pan_jax pan_smp",
        "what": "train",
        "batch": "max",
        "skipped": "no device memory limit to fit it into (set --device_memory_gb)",
    }


def test_largest_batch_fits_the_state_plus_a_linear_share_per_image():
    gb = 2**30
    # 4 GB of state and 16 images in 20 GB: 1 GB per image; 90% of 80 GB leaves room for 68.
    assert bench.largest_batch(20 * gb, 4 * gb, 16, 80 * gb, 8) == 64
    assert bench.largest_batch(20 * gb, 4 * gb, 16, 80 * gb, 1) == 68
    assert bench.largest_batch(20 * gb, 4 * gb, 16, 4 * gb, 8) == 0


class _MemoryPlan:
    """A compiled step's `memory_analysis()`, in GiB."""

    def __init__(self, **gib):
        self.analysis = types.SimpleNamespace(**{k: v * 2**30 for k, v in gib.items()})

    def memory_analysis(self):
        return self.analysis


def test_the_largest_batch_comes_from_the_step_buffers_on_every_device(monkeypatch):
    monkeypatch.setattr(bench, "FLAGS", parse_bench_flags("--device_memory_gb=40"))
    monkeypatch.setattr(bench.jax, "device_count", lambda: 2)
    # XLA:CPU's peak leaves the temporaries out: the buffers (6 + 4 - 4 donated + 6) count them.
    plan = _MemoryPlan(
        argument_size_in_bytes=6, output_size_in_bytes=4, alias_size_in_bytes=4,
        temp_size_in_bytes=6, peak_memory_in_bytes=10,
    )  # fmt: skip
    memory = bench._compiled_memory(plan, state_bytes=4 * 2**30, batch=16)
    assert memory["compiled_peak_gb"] == 12 and memory["device_memory_gb"] == 40
    # 8 images per device in 12 - 4 GiB of state: 1 GiB each; 90% of 40 GiB holds 32 more per
    # device, so 64 on both. Without the donated buffers subtracted, the temporaries, the second
    # device or GiB units (not GB) the estimate would be 32, 80, 32 or 48.
    assert memory["largest_batch_estimate"] == 64


def test_the_largest_batch_row_is_skipped_where_it_is_no_larger(monkeypatch):
    # An estimate equal to the batch measured the same step again as the "largest".
    monkeypatch.setattr(bench, "FLAGS", parse_bench_flags())
    recorded, skipped = [], []
    row = {"impl": "pan_jax pan_smp", "what": "train", "batch": 16, "compile_s": 1.0,
           "step_s": 0.1, "images_per_s": 160.0, "compiled_peak_gb": 12.0}  # fmt: skip
    for estimate in (16, 24):
        report = {"results": [{**row, "largest_batch_estimate": estimate}]}
        bench.record_largest_batch(
            report, 16, lambda *args: recorded.append(args[:3]), lambda *args: skipped.append(args)
        )
    assert skipped == [("pan_jax pan_smp", "train", "max",
                        "batch 16 is already the largest that fits (estimate: 16)")]  # fmt: skip
    assert recorded == [("pan_jax pan_smp", "train", 24)]


def test_the_largest_batch_row_takes_longer_in_proportion_to_its_batch(monkeypatch):
    # The deadline check priced the largest batch's steps at the smaller batch's step time.
    flag_values = parse_bench_flags("--steps=10", "--warmup=2", "--steps_per_sample=4")
    monkeypatch.setattr(bench, "FLAGS", flag_values)
    row = {"compile_s": 40.0, "step_s": 0.5}
    # 1.25 × 40 s of compile, (2 + 10 × 4) steps of 0.5 s × 64 / 16, 10 s more.
    assert bench.largest_batch_seconds(row, 16, 64) == 50 + 42 * 2.0 + 10


def parse_bench_flags(*args):
    """The bench's flags parsed from `args` into a FlagValues of their own (not the global one)."""
    flag_values = flags.FlagValues()
    bench.define_flags(flag_values)
    flag_values(["bench", *args])
    return flag_values


@pytest.mark.parametrize(
    "args, message",
    [
        (["--what=trian"], r"--what=.*expected a comma list of train, forward, not trian"),
        (["--what=train,forwad"], r"--what=.*not forwad"),
        (["--what="], r"--what=.*expected a comma list"),
        (["--peer=eagr"], r"--peer=.*expected a comma list of eager, compile, none, not eagr"),
        (["--model=panx"], r"--model=panx.*pan_smp"),
        (["--backbone=resnet19"], r"--backbone=resnet19.*resnet18"),  # was every row an error
        (["--batch=abc"], r"--batch=.*expected positive integers"),
        (["--batch=16,0"], r"--batch=.*expected positive integers"),
        (["--batch=²"], r"--batch=.*expected positive integers"),
        (["--batch=max"], r"--batch=.*optionally then max"),  # no batch to estimate it from
        (["--batch=max,16"], r"--batch=.*expected positive integers"),
        (["--batch=16,max,max"], r"--batch=.*expected positive integers"),
        (["--what=train,train"], r"--what=.*at most once"),
        (["--budget_s=-5"], r"--budget_s=-5"),
        (["--steps=0"], r"--steps=0"),
        (["--nojax", "--peer=none"], r"--nojax with --peer=none measures nothing"),
        # A traceback once the first row was measured, and the row lost.
        (["--json=/nowhere/b.json"], r"--json: no such directory to write the file into"),
    ],
)
def test_bench_flags_refuse_values_it_cannot_measure(args, message):
    # Before, --what=trian measured the forward pass labelled "trian" and --batch=abc failed in
    # int() after setting up: a typo must stop the bench before anything runs.
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        parse_bench_flags(*args)


def test_bench_flags_keep_their_comma_lists():
    parsed = parse_bench_flags("--what=train,forward", "--peer=eager,compile", "--batch=8,16")
    assert parsed.what == ["train", "forward"] and parsed.peer == ["eager", "compile"]
    assert parsed.batch == ["8", "16"]
    assert parse_bench_flags("--batch=16,max").batch == ["16", "max"]
    defaults = parse_bench_flags()
    assert defaults.what == ["train", "forward"] and defaults.peer == ["eager"]
    assert defaults.batch == ["16"] and defaults.model == "pan_smp"


def bench_gpu_commands():
    """The flags every `run NAME SECONDS ARGS...` of launch/bench_gpu.sh passes to the bench."""
    with open(os.path.join(ROOT, "launch", "bench_gpu.sh")) as f:
        script = f.read().replace("\\\n", " ")  # join continued lines
    common = re.search(r"python3 -m pan_jax\.bench (.*?) \"\$@\"", script).group(1)
    commands = []
    for line in script.splitlines():
        if line.strip().startswith("run "):
            args = shlex.split(line.strip().removesuffix(";;"))[3:]  # after run NAME SECONDS
            commands.append([*shlex.split(common), *args])
    values = {"$out": "out", "$budget": "100", "$deadline_s": "160"}
    values["$parts"] = tempfile.gettempdir()  # --json's folder must exist
    return [[functools.reduce(lambda a, v: a.replace(*v), values.items(), arg) for arg in c]
            for c in commands]  # fmt: skip


def test_bench_gpu_script_flags_still_parse():
    commands = bench_gpu_commands()
    # In file order: baseline smp pan forward compile bn_moments pointwise
    assert len(commands) == 7, commands
    for command in commands:
        parse_bench_flags(*command)
    baseline, smp, pan, forward = (parse_bench_flags(*command) for command in commands[:4])
    assert smp.what == ["train"] and smp.peer == ["eager"]
    assert (forward.what, forward.peer, forward.model) == (["forward"], ["eager"], "pan_smp")
    assert smp.model == "pan_smp" and pan.model == "pan"
    # Issue 7's rows: batch 16, then the largest batch that fits, for both models.
    assert smp.batch == pan.batch == ["16", "max"]
    # The A/Bs' baseline is the smp part's train row: the same step.
    assert (baseline.what, baseline.batch, baseline.model) == (["train"], ["16"], "pan_smp")


def run_python(script: str) -> subprocess.CompletedProcess:
    """`script` in a fresh CPU-only Python at the repository's root."""
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "pan_jax.bench", *args],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


# Tiny and quick, in case a check below lets the measurement run after all.
TINY = ("--backbone=resnet18", "--crop=64", "--batch=1", "--steps=1", "--warmup=0",
        "--dtype=float32", "--peak_tflops=1", "--peer=none")  # fmt: skip


def test_bench_cli_exits_non_zero_on_a_misspelt_flag_value():
    result = run_bench(*TINY, "--what=trian")
    assert result.returncode != 0, result.stdout[-2000:]
    assert "--what=" in result.stderr and "not trian" in result.stderr, result.stderr[-2000:]
    assert "trian" not in result.stdout  # nothing measured under the typo


def test_bench_exits_non_zero_when_every_measurement_failed(tmp_path):
    # A crop under pan_smp's 128 px fails every measurement: the rows say why, the status says so.
    result = run_bench(*TINY, "--what=forward", f"--json={tmp_path / 'b.json'}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: no measurement succeeded" in result.stderr
    (row,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert "too small" in row["error"] and "≥ 128" in row["error"], row


def test_the_peers_training_at_batch_1_is_skipped_with_the_reason(tmp_path):
    # It was a row of torch's "Expected more than 1 value per channel when training".
    flags = ["--backbone=resnet18", "--crop=128", "--batch=1", "--what=train", "--nojax"]
    result = run_bench(*flags, "--peer=eager", "--peak_tflops=1", f"--json={tmp_path / 'b'}")
    assert result.returncode == 1, result.stderr[-2000:]  # nothing else was asked for
    (row,) = json.loads((tmp_path / "b").read_text())["results"]
    assert row["impl"] == "smp torch eager" and "batch 2 or more" in row["skipped"]


def test_mfu_counts_every_device_a_row_ran_on(tmp_path):
    """On a host with two devices ours splits the batch over both: its MFU is over both peaks."""
    flags = [*TINY, "--crop=128", "--batch=2", "--what=train,forward", f"--json={tmp_path / 'b'}"]
    result = subprocess.run(
        [sys.executable, "-m", "pan_jax.bench", *flags],
        cwd=ROOT,
        env={
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "b").read_text())
    assert report["machine"]["device_count"] == 2
    for row in report["results"]:  # --peak_tflops=1 per device
        expected = row["flops_per_image"] * row["images_per_s"] / 1e12 / 2
        assert row["mfu"] == pytest.approx(expected, rel=1e-6), row


def test_the_peers_mfu_is_over_one_device_and_only_for_our_count_of_its_network(
    monkeypatch, tmp_path
):
    # The peer runs on one device: its MFU over every device's peak would be too small by their
    # number; and `pan`'s FLOP count, another network, must give the SMP peer no MFU.
    for name in ("POINTWISE_AS_MATMUL", "BATCHNORM_ONE_PASS"):  # main sets them from flags
        monkeypatch.setattr(bench.layers, name, getattr(bench.layers, name))
    monkeypatch.setattr(bench.jax.config, "update", lambda *args: None)
    monkeypatch.setattr(bench.jax, "device_count", lambda: 2)
    timing = {"compile_s": 1.0, "step_s": 1.0}
    monkeypatch.setattr(bench, "jax_forward", lambda *args: {
        **timing, "images_per_s": 2.0, "flops_per_image": 1e12})  # fmt: skip
    monkeypatch.setattr(bench, "torch_peer", lambda *args: {**timing, "images_per_s": 4.0})
    mfus = {}
    for model in ("pan_smp", "pan"):
        args = ["--what=forward", "--batch=2", "--peak_tflops=1", f"--json={tmp_path / 'b'}"]
        monkeypatch.setattr(bench, "FLAGS", parse_bench_flags(f"--model={model}", *args))
        assert bench.main(["bench"]) == 0
        rows = json.loads((tmp_path / "b").read_text())["results"]
        mfus[model] = {row["impl"].split()[0]: row.get("mfu") for row in rows}
    # 1 TFLOP per image at 2 images/s on 2 devices of 1 TFLOP/s; the peer's 4 images/s on one.
    assert mfus == {"pan_smp": {"pan_jax": 1.0, "smp": 4.0}, "pan": {"pan_jax": 1.0, "smp": None}}


def test_rows_over_the_budget_are_recorded_as_skipped(tmp_path):
    # A budget spent before the first row: every row is skipped, in the JSON as in the table.
    result = run_bench(
        *TINY, "--budget_s=0.001", "--what=train,forward", "--batch=1,max",
        f"--json={tmp_path / 'b'}",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    rows = json.loads((tmp_path / "b").read_text())["results"]
    assert [(r["what"], r["batch"], r["skipped"]) for r in rows] == [
        ("train", 1, "over --budget_s"),
        ("forward", 1, "over --budget_s"),
        ("train", "max", "the train row at batch 1, to estimate it from, was skipped"),
    ]
    assert "skipped: over --budget_s" in result.stdout


def test_a_largest_batch_row_that_would_outlast_the_deadline_is_skipped(tmp_path):
    # A time-boxed part was killed in its largest-batch row (about 100 s on an H200), which
    # left no trace of it, and none of its compile time.
    result = run_bench(
        *TINY, "--batch=2,max", "--what=train", "--crop=128", "--device_memory_gb=2",
        "--deadline_s=1",
        f"--json={tmp_path / 'b'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    at_2, largest = json.loads((tmp_path / "b").read_text())["results"]
    assert at_2["batch"] == 2 and at_2["images_per_s"] > 0 and at_2["largest_batch_estimate"] > 2
    assert largest["batch"] == "max", largest
    assert re.fullmatch(
        rf"batch {at_2['largest_batch_estimate']} would take about \d+ s \(from the row at batch "
        r"2\), \d+ s are left before --deadline_s",
        largest["skipped"],
    ), largest


def test_bench_gpu_script_refuses_to_start_without_the_torch_peer(tmp_path):
    # The GPU image lacks segmentation_models_pytorch: the call ran our rows, each peer row an
    # error, and the goals against SMP went unmeasured after the whole device call.
    shadow = tmp_path / "shadow" / "segmentation_models_pytorch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not on this image')\n")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}",
        "BENCH_PARTS": "pan forward",
    }
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "bench_gpu.sh"), str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the SMP peer cannot run here" in result.stderr
    assert "not on this image" in result.stderr and not (tmp_path / "out").exists()


def h200_parts():
    """The ninth session's H200 figures (docs/benchmarks.md), as launch/bench_gpu.sh merges its
    parts: ours and the eager peer in one, the torch.compile peer in another, and an A/B."""
    machine = {"jax_device": "gpu:NVIDIA H200", "device_count": 1, "jax": "0.11.2",
               "python": "3.12", "cpu": "Xeon", "cpu_count": 16, "date": "2026-11-27"}  # fmt: skip

    def part(results, **args):
        args = {"model": "pan_smp", "backbone": "resnet101", "dtype": "bfloat16", **args}
        return {"machine": machine, "args": args, "peak_tflops": 734.8,
                "peak_source": "bfloat16 matmul", "results": results}  # fmt: skip

    bf16 = "bfloat16 autocast, channels_last"
    return {
        "smp": part([
            {"impl": "pan_jax pan_smp", "what": "train", "batch": 16, "images_per_s": 401.6,
             "step_s": 0.0398, "compile_s": 57.6, "mfu": 0.175, "peak_memory_gb": 6.43},
            {"impl": "smp torch eager", "what": "train", "batch": 16, "images_per_s": 336.1,
             "step_s": 0.0476, "compile_s": 1.9, "dtype": bf16},
            {"impl": "pan_jax pan_smp", "what": "train", "batch": 240, "images_per_s": 450.0,
             "step_s": 0.533, "compile_s": 72.6, "mfu": 0.196, "largest_batch_from": 16},
        ]),
        "pan": {"error": "unreadable JSON: cut by its time limit"},
        "baseline": part([  # our default step again, for the A/B below: no second goal figure
            {"impl": "pan_jax pan_smp", "what": "train", "batch": 16, "images_per_s": 400.0,
             "step_s": 0.04, "compile_s": 58.0, "mfu": 0.174},
            {"impl": "pan_jax pan_smp", "what": "train", "batch": "max",
             "error": "JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory\nBuffer | 1 GB"},
        ]),
        "bn_moments": part(  # the A/B's other lowering: not our default, no goal of ours
            [{"impl": "pan_jax pan_smp", "what": "train", "batch": 16, "images_per_s": 380.0,
              "step_s": 0.0421, "compile_s": 30.0, "mfu": 0.6}],
            bn_moments="two_pass",
        ),
        "compile": {**part([
            {"impl": "smp torch compile", "what": "train", "batch": 16, "images_per_s": 318.8,
             "step_s": 0.0502, "compile_s": 104.6, "dtype": bf16},
        ]), "peak_tflops": 1.0, "peak_source": "--peak_tflops"},  # --nojax: a dummy peak
    }  # fmt: skip


def test_goals_are_stated_next_to_the_figures_of_a_gpu_call(tmp_path):
    merged = tmp_path / "bench.json"
    merged.write_text(json.dumps(h200_parts()))
    reports = tables.load(str(merged))
    assert len(reports) == 4  # the cut part has no results
    goals = {g.goal: (g.status, g.figure) for g in tables.goals(reports)}
    assert goals == {
        "`pan_smp` training ≥ 1.5× SMP torch eager": (
            "missed", "1.19× (401.6 against 336.1 img/s, batch 16)"),
        # The peer of another part of the same call pairs with ours.
        "`pan_smp` training ≥ 1.0× SMP torch.compile": (
            "met", "1.26× (401.6 against 318.8 img/s, batch 16)"),
        "MFU ≥ 50% of the measured bfloat16 matmul rate": (
            "missed", "17.5% (pan_smp, batch 16); 19.6% (pan_smp, batch 240)"),
        "train step compile ≤ 60 s": (
            "missed", "57.6 s (pan_smp, batch 16); 72.6 s (pan_smp, batch 240)"),
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pan_jax.bench_report", str(merged)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    md = result.stdout
    assert "| pan_jax `pan_smp` R101 | train | 16 | 401.6 | 39.8 | 57.6 s (compile) | 17.5% |" in md
    assert tables.main(["bench_report", "--help"]) == 0  # was read as a file named --help
    assert "| pan_jax `pan_smp` R101 | train | 240 (largest) | 450.0 |" in md
    assert "| **ratio pan_jax / torch eager** | train | 16 | **1.19×** |" in md
    assert "| SMP PAN R101, torch.compile | train | 16 | 318.8 | 50.2 | 104.6 s |" in md
    # Paired across parts, as in the goals; the A/B against our default of the same call.
    assert "| **ratio pan_jax / torch.compile** | train | 16 | **1.26×** |" in md
    assert "| **ratio `--bn_moments=two_pass` / our default** | train | 16 | **0.95×** |" in md
    assert "| MFU ≥ 50% of the measured bfloat16 matmul rate | 17.5% (pan_smp, batch 16)" in md
    assert "Measured matmul rate (MFU's denominator): 735 TFLOP/s." in md  # not the dummy 1
    # An out-of-memory error stays in its row's cells.
    assert (
        "| max | JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory Buffer \\| 1 GB | | | | |" in md
    )


def cpu_forward_report(ours_per_s, peer_per_s, args=None, compile_s=1.0):
    row = {"what": "forward", "batch": 2, "step_s": 1.0, "compile_s": compile_s}
    return {
        "machine": {"jax_device": "cpu:cpu", "device_count": 1},
        "args": {"model": "pan_smp", "dtype": "float32", **(args or {})},
        "results": [
            {"impl": "pan_jax pan_smp", **row, "images_per_s": ours_per_s},
            {"impl": "smp torch eager", **row, "images_per_s": peer_per_s, "dtype": "float32"},
        ],
    }


def test_a_goal_met_exactly_is_met():
    # "≥ 1.0×" and "≤ 60 s" include the bound: an equal speed or a 60 s compile is not a miss.
    (eager, _) = tables.goals([cpu_forward_report(2.0, 2.0)])
    assert eager.status == "met" and eager.figure.startswith("1.00×")
    gpu = cpu_forward_report(2.0, 2.0, compile_s=60.0)
    gpu["machine"]["jax_device"] = "gpu:NVIDIA H200"
    gpu["results"][0].update(what="train", mfu=0.5)
    status = {goal.goal: goal.status for goal in tables.goals([gpu])}
    assert status["train step compile ≤ 60 s"] == "met"
    assert status["MFU ≥ 50% of the measured float32 matmul rate"] == "met"


def test_goals_leave_out_an_ab_part_whichever_order_the_parts_come_in():
    # Passed before our default's part (bench_report CALL2 CALL1), the A/B's rows stood for ours.
    default = cpu_forward_report(2.0, 2.0)
    ab = cpu_forward_report(1.0, 2.0, args={"bn_moments": "two_pass"})
    (eager, _) = tables.goals([ab, default])
    assert (eager.status, eager.figure[:5]) == ("met", "1.00×")


def test_bench_report_pairs_the_calls_of_one_machine(tmp_path):
    # A second device call on the warm machine (BENCH_BASELINE=previous): its A/B pairs with
    # the first call's default row.
    parts = h200_parts()
    first, second = tmp_path / "call1.json", tmp_path / "call2.json"
    first.write_text(json.dumps({"smp": parts["smp"]}))
    second.write_text(json.dumps({"bn_moments": parts["bn_moments"]}))
    result = subprocess.run(
        [sys.executable, "-m", "pan_jax.bench_report", str(first), str(second)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| **ratio `--bn_moments=two_pass` / our default** | train | 16 | **0.95×** |" in (
        result.stdout
    )


def test_steps_per_sample_fall_with_the_batch_on_accelerators():
    # Enough steps per sample to hide the host's dispatch at batch 16, few where steps are long.
    assert [bench.default_steps_per_sample(b, "gpu") for b in (1, 16, 20, 26, 27, 240)] == [
        5, 5, 4, 3, 2, 2,
    ]  # fmt: skip
    assert bench.default_steps_per_sample(240, "cpu") == 1


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpus():
    assert bench.compute_dtype("auto", on_cpu=False) == "bfloat16"
    assert bench.compute_dtype("auto", on_cpu=True) == "float32"  # as the peer on a CPU
    assert bench.compute_dtype("bfloat16", on_cpu=True) == "bfloat16"


def test_bench_report_names_a_file_it_cannot_read(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"pan": {"error": "cut"}}))
    for path, message in [(tmp_path / "none.json", "No such file"), (empty, "no bench results")]:
        result = subprocess.run(
            [sys.executable, "-m", "pan_jax.bench_report", str(path)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1 and f"error: {path}: " in result.stderr, result.stderr
        assert message in result.stderr


def test_a_ratio_across_parts_names_the_dtype_of_the_part_that_ran_ours():
    # The --nojax part (first here) has a dtype flag too; ours ran in the other part's.
    row = {"what": "train", "batch": 2, "step_s": 1.0, "compile_s": 1.0, "images_per_s": 2.0}
    peer = {"machine": {}, "args": {"model": "pan_smp", "dtype": "bfloat16"},
            "results": [{"impl": "smp torch eager", **row, "dtype": "float32"}]}  # fmt: skip
    ours = {"machine": {}, "args": {"model": "pan_smp", "dtype": "float32"},
            "results": [{"impl": "pan_jax pan_smp", **row}]}  # fmt: skip
    (ratio,) = tables.paired_ratios([peer, ours])
    assert ratio.ratio == 1.0 and ratio.unequal_dtypes == ""


def test_ratios_are_printed_only_for_the_peers_own_network(capsys):
    row = {"what": "train", "batch": 2, "step_s": 1.0, "compile_s": 1.0, "images_per_s": 2.0}
    report = {
        "machine": {"device_count": 1},
        "peak_tflops": 1.0,
        "peak_source": "--peak_tflops",
        "args": {"model": "pan_smp", "dtype": "float32"},
        "results": [
            {"impl": "pan_jax x", **row},
            {"impl": "smp torch eager", **row, "dtype": "float32"},
        ],
    }
    tables.print_table(report)
    assert "ratio pan_jax / smp torch eager (train, batch 2): 1.00x\n" in capsys.readouterr().out
    report["args"]["dtype"] = "bfloat16"  # --dtype=bfloat16 on a CPU: the peer stays float32
    tables.print_table(report)
    assert "1.00x (ours bfloat16, the peer float32)\n" in capsys.readouterr().out
    report["results"][1]["dtype"] = "bfloat16 autocast, channels_last"  # as on a GPU
    tables.print_table(report)
    assert "batch 2): 1.00x\n" in capsys.readouterr().out
    report["machine"]["device_count"] = 2
    tables.print_table(report)
    assert "1.00x (pan_jax on 2 devices, the peer on one)" in capsys.readouterr().out
    report["args"]["model"] = "pan"  # the paper's PAN is not SMP's network
    tables.print_table(report)
    assert "ratio" not in capsys.readouterr().out


def test_bench_profile_says_where_the_time_goes(bench_report):
    report, stdout = bench_report
    profile = next(r for r in report["results"] if r["what"] == "train" and "pan_jax" in r["impl"])
    profile = profile["profile"]
    assert profile["categories"]["convolution"] > 0.3  # a ResNet's time is mostly convolutions
    assert sum(profile["categories"].values()) == pytest.approx(1.0)
    scopes = set(profile["scopes"])
    assert any(s.startswith("backbone/layer") for s in scopes), scopes
    assert any(s.startswith("bwd backbone/layer") for s in scopes), scopes
    assert any("decoder" in s for s in scopes), scopes
    assert os.listdir(profile["trace_dir"])  # the trace stays for TensorBoard / Perfetto
    assert "by kind:" in stdout and "by module:" in stdout


def test_the_profile_table_can_be_made_again_from_the_saved_trace(bench_report, tmp_path, capsys):
    # As launch/bench_gpu.sh brings them back from a GPU machine: two gzipped files.
    report, _ = bench_report
    row = next(r for r in report["results"] if r["what"] == "train" and "pan_jax" in r["impl"])
    directory = row["profile"]["trace_dir"]
    (trace,) = glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.xplane.pb"))
    hlo = os.path.join(directory, op_profile.HLO_FILE)
    for source, target in [(trace, "t.xplane.pb.gz"), (hlo, "hlo.txt.gz")]:
        with open(source, "rb") as f, gzip.open(tmp_path / target, "wb") as g:
            g.write(f.read())
    again = op_profile.summarize(str(tmp_path / "t.xplane.pb.gz"), "", 3)
    assert again["op_ms_per_step"] == pytest.approx(row["profile"]["op_ms_per_step"])
    args = [str(tmp_path / "t.xplane.pb.gz"), f"--hlo={tmp_path / 'hlo.txt.gz'}", "--top=5"]
    assert op_profile.main(args) == 0
    table = capsys.readouterr().out
    assert f"{row['profile']['op_ms_per_step']:.1f} ms per step" in table
    for kind, share in row["profile"]["categories"].items():  # the same table as in the run
        assert f"{kind} {share:.0%}" in table
    assert op_profile.main([directory]) == 0  # a bench profile directory holds its HLO
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        op_profile.main([str(tmp_path / "t.xplane.pb.gz")])  # no HLO beside a single file
    # These were tracebacks (and --steps=-1 negative times); another program's HLO is said.
    (tmp_path / "empty").mkdir()
    (tmp_path / "other_hlo.txt").write_text("HloModule other\n")
    for bad, message in [
        (["--steps=0"], "--steps=0: expected the number of steps traced"),
        ([str(tmp_path / "empty"), "--hlo", str(tmp_path / "hlo.txt.gz")], "no *.xplane.pb"),
        ([str(tmp_path / "hlo.txt.gz"), "--hlo", str(tmp_path / "hlo.txt.gz")], "not a jax"),
    ]:
        with pytest.raises(SystemExit):
            op_profile.main([*args[:2], *bad] if bad[0].startswith("--") else bad)
        assert message in capsys.readouterr().err
    assert op_profile.main([args[0], f"--hlo={tmp_path / 'other_hlo.txt'}"]) == 0
    assert "op time is in kernels" in capsys.readouterr().err


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = ConvBN(16, 3, name="block")(x, train=True)
        return jnp.mean(x)


def test_profile_names_kinds_and_modules(tmp_path):
    model = _ConvNet()
    x = jnp.ones((2, 32, 32, 8))
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return out

    step = jax.jit(jax.grad(loss))
    compiled = step.lower(variables["params"]).compile()
    report = op_profile.profile(
        lambda: jax.block_until_ready(compiled(variables["params"])),
        compiled.as_text(),
        str(tmp_path),
        steps=2,
    )
    kinds = {op["category"] for op in report["ops"]}
    assert "convolution" in kinds
    convs = [op for op in report["ops"] if op["category"] == "convolution"]
    scopes = {op["scope"] for op in convs}
    assert "block/conv" in scopes
    # The weight gradient has no metadata of its own; it is scoped by the gradient it reads.
    assert any(scope.startswith("bwd block/") for scope in scopes), scopes
    assert all(op["scope"] != "(unknown)" for op in report["ops"])
    assert report["ops"] == sorted(report["ops"], key=lambda op: -op["ms_per_step"])
    assert "block/conv" in op_profile.format_report(report)


GPU_HLO = """\
HloModule jit_step

%fused_reduce (param_0: f32[8,4,4,16]) -> f32[16] {
  ROOT %reduce.1 = f32[16]{0} reduce(%param_0, %c), dimensions={0,1,2}, to_apply=%add
}

ENTRY %main (p0: f32[8,4,4,16], p1: f32[3,3,16,16]) -> f32[16] {
  %p0 = f32[8,4,4,16]{3,2,1,0} parameter(0)
  %cudnn-conv.3 = (f32[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/jvp(PAN)/backbone/layer3_1/conv2/conv_general_dilated"}
  %custom-call.7 = f32[16,16]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/transpose(jvp(PAN))/decoder/fpa/oh,nhwc->nowc/dot_general"}
  %input_reduce_fusion = f32[16]{0} fusion(%cudnn-conv.3), kind=kInput, calls=%fused_reduce
  %cudnn-conv.4 = (f32[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), custom_call_target="__cudnn$convForward", metadata={op_name="jit(forward)/PAN/decoder/gau1/conv/conv_general_dilated"}
  %cudnn-conv-bw-filter.1 = (f32[3,3,16,16]{3,2,1,0}, u8[0]{0}) custom-call(%cudnn-conv.4, %custom-call.7), custom_call_target="__cudnn$convBackwardFilter"
  %copy.2 = f32[16]{0} copy(%input_reduce_fusion)
  ROOT %loop_add_fusion = f32[16]{0} fusion(%copy.2), kind=kLoop, calls=%fused_add
}
"""  # noqa: E501 (HLO lines are as long as XLA writes them)


def test_instruction_info_reads_gpu_hlo():
    info = op_profile.instruction_info(GPU_HLO)
    assert info["cudnn-conv.3"] == ("convolution", "backbone/layer3_1")
    assert info["custom-call.7"] == ("matmul", "bwd decoder/fpa")
    # No metadata of its own: scoped by what it reads.
    assert info["input_reduce_fusion"] == ("reduction", "backbone/layer3_1")
    # Outside jvp(...) the top module's class name leads the path; it is dropped.
    assert info["cudnn-conv.4"] == ("convolution", "decoder/gau1")
    # A weight gradient reads a forward activation and a gradient: the backward scope wins.
    assert info["cudnn-conv-bw-filter.1"] == ("convolution", "bwd decoder/fpa")
    assert info["copy.2"][0] == "copy/transpose"
    assert info["loop_add_fusion"][0] == "elementwise fusion"
    assert "p0" not in info


GPU_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines { id: 1 name: "XLA Modules" events { metadata_id: 3 duration_ps: 9000000 } }
  lines {
    id: 2
    name: "Stream #13(Compute)"
    events { metadata_id: 1 duration_ps: 2000000 stats { metadata_id: 1 str_value: "cudnn-conv.3" } }
    events { metadata_id: 1 offset_ps: 3000000 duration_ps: 1000000 stats { metadata_id: 1 str_value: "cudnn-conv.3" } }
    events { metadata_id: 2 offset_ps: 5000000 duration_ps: 500000 }
  }
  event_metadata { key: 1 value { id: 1 name: "sm90_xmma_fprop_kernel" } }
  event_metadata { key: 2 value { id: 2 name: "MemcpyD2D" } }
  event_metadata { key: 3 value { id: 3 name: "jit_step" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
planes {
  id: 2
  name: "/host:CPU"
  lines { id: 1 name: "launch" events { metadata_id: 1 duration_ps: 7000000 stats { metadata_id: 1 str_value: "cudnn-conv.3" } } }
  event_metadata { key: 1 value { id: 1 name: "ThunkLaunch" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""  # noqa: E501 (one event per line reads best)


def test_op_times_sums_gpu_kernels_per_hlo_op(tmp_path):
    trace = tmp_path / "plugins" / "profile" / "run" / "host.xplane.pb"
    trace.parent.mkdir(parents=True)
    trace.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(GPU_TRACE))
    times = op_profile.op_times(str(tmp_path))
    # Two kernels of one convolution add up; the memcpy is device time under its own name; the
    # module span and the host's launch events would count the same work twice.
    assert times == pytest.approx({"cudnn-conv.3": 3e-6, "MemcpyD2D": 0.5e-6})
    with pytest.raises(FileNotFoundError, match=r"no \*\.xplane\.pb trace"):
        op_profile.op_times(str(tmp_path / "empty"))


def test_op_times_are_per_step_from_the_newest_trace(tmp_path):
    # A second run into the same directory read the first run's trace; a trace of 2 steps was
    # reported as the time of one.
    for run, op in [("2026_01_02_00_00_00", "cudnn-conv.3"), ("2026_01_01_00_00_00", "copy.2")]:
        trace = tmp_path / "plugins" / "profile" / run / "host.xplane.pb"
        trace.parent.mkdir(parents=True)
        proto = GPU_TRACE.replace('"cudnn-conv.3"', f'"{op}"')
        trace.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(proto))
    report = op_profile.summarize(str(tmp_path), GPU_HLO, steps=2)
    ops = {op["name"]: op["ms_per_step"] for op in report["ops"]}
    assert ops == pytest.approx({"cudnn-conv.3": 1.5e-3, "MemcpyD2D": 0.25e-3})
    assert report["op_ms_per_step"] == pytest.approx(1.75e-3)


def test_collectives_are_named_as_such():
    # Not all-reduce alone: a multi-GPU step's all-gathers and reduce-scatters are ones too.
    hlo = GPU_HLO.replace(
        "  %copy.2 =",
        "  %all-gather.1 = f32[32]{0} all-gather(%p0), dimensions={0}\n"
        "  %reduce-scatter.2 = f32[8]{0} reduce-scatter(%p0), dimensions={0}, to_apply=%add\n"
        "  %all-reduce-start.3 = f32[16]{0} all-reduce-start(%p0), to_apply=%add\n"
        "  %copy.2 =",
    )
    info = op_profile.instruction_info(hlo)
    names = ("all-gather.1", "reduce-scatter.2", "all-reduce-start.3")
    assert [info[name][0] for name in names] == ["collective"] * 3


DEDUPLICATED_HLO = """\
HloModule jit_step

ENTRY %main (p0: f32[8,16]) -> f32[8,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %loop_add_fusion.3 = f32[8,16]{1,0} fusion(%p0), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/transpose(jvp(PAN))/backbone/layer3_1/bn1/add"}
  %loop_add_fusion.5 = f32[8,16]{1,0} fusion(%p0), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/transpose(jvp(PAN))/backbone/layer3_2/bn1/add" deduplicated_name="loop_add_fusion.3"}
  %loop_convert_fusion.2 = bf16[8,16]{1,0} fusion(%p0), kind=kLoop, calls=%fused_convert, metadata={op_name="jit(step)/jvp(PAN)/head/convert_element_type"}
  ROOT %loop_add_fusion.9 = f32[8,16]{1,0} fusion(%p0), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp(PAN)/decoder/fpa/add"}
}
"""  # noqa: E501

COMMAND_BUFFER_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 2
    name: "Stream #14(Compute)"
    events { metadata_id: 1 duration_ps: 2000000 stats { metadata_id: 1 str_value: "command_buffer_4" } }
    events { metadata_id: 1 offset_ps: 3000000 duration_ps: 1000000 stats { metadata_id: 1 str_value: "command_buffer_7" } }
    events { metadata_id: 2 offset_ps: 5000000 duration_ps: 500000 stats { metadata_id: 1 str_value: "command_buffer_7" } }
    events { metadata_id: 3 offset_ps: 6000000 duration_ps: 250000 stats { metadata_id: 1 str_value: "loop_add_fusion.9" } }
    events { metadata_id: 4 offset_ps: 7000000 duration_ps: 250000 stats { metadata_id: 1 str_value: "command_buffer_7" } }
    events { metadata_id: 5 offset_ps: 8000000 duration_ps: 250000 stats { metadata_id: 1 str_value: "command_buffer_7" } }
  }
  event_metadata { key: 1 value { id: 1 name: "loop_add_fusion_5" } }
  event_metadata { key: 2 value { id: 2 name: "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT" } }
  event_metadata { key: 3 value { id: 3 name: "loop_add_fusion_9" } }
  event_metadata { key: 4 value { id: 4 name: "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32" } }
  event_metadata { key: 5 value { id: 5 name: "loop_convert_fusion_2" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""  # noqa: E501


def test_kernels_of_cuda_graphs_are_named_by_their_kernel(tmp_path):
    # XLA:GPU runs most of a step as CUDA graphs ("command buffers"): every kernel of one is
    # tagged with the graph's thunk, so the report must go by the kernel's own name.
    trace = tmp_path / "t.xplane.pb"
    trace.write_bytes(
        jax.profiler.ProfileData.text_proto_to_serialized_xspace(COMMAND_BUFFER_TRACE)
    )
    report = op_profile.summarize(str(trace), DEDUPLICATED_HLO, steps=1)
    ops = {op["name"]: op for op in report["ops"]}
    assert set(ops) == {"loop_add_fusion.5", "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT",
                        "loop_add_fusion.9", "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32",
                        "loop_convert_fusion.2"}  # fmt: skip
    # One kernel serves both deduplicated fusions: its time is theirs, scoped by what they share.
    assert ops["loop_add_fusion.5"]["ms_per_step"] == pytest.approx(3e-3)
    assert ops["loop_add_fusion.5"]["category"] == "elementwise fusion"
    assert ops["loop_add_fusion.5"]["scope"] == "bwd backbone/layer3_*"
    assert ops["loop_add_fusion.9"]["scope"] == "decoder/fpa"  # tagged by its own instruction
    library = ops["nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT"]
    assert (library["category"], library["scope"]) == ("matmul", "(unmapped kernel)")
    # cuDNN's convolutions are implicit GEMMs; XLA's conversions are not convolutions.
    assert ops["sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32"]["category"] == "convolution"
    assert ops["loop_convert_fusion.2"]["category"] == "elementwise fusion"
    assert not any(name.startswith("command_buffer") for name in ops)


def test_median_time_dispatches_a_sample_before_it_waits():
    calls = []
    seconds = bench.median_time(
        lambda: calls.append("dispatch"), lambda: calls.append("wait"), steps=3, warmup=1,
        steps_per_sample=4,
    )  # fmt: skip
    assert calls == ["dispatch", "wait"] + (["dispatch"] * 4 + ["wait"]) * 3
    assert seconds >= 0


def test_median_time_is_the_median_sample_per_step(monkeypatch):
    # A sample's time read as one step's (5× a GPU's step time), or the fastest sample's, went
    # unseen.
    clock = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    step_seconds = iter([1.0] * 4 + [2.0] * 4 + [9.0] * 4)  # three samples of 4 steps

    def dispatch():
        clock[0] += next(step_seconds)

    seconds = bench.median_time(dispatch, lambda: None, steps=3, warmup=0, steps_per_sample=4)
    assert seconds == 2.0


def test_the_matmul_rate_counts_two_flops_per_multiply_add(monkeypatch):
    # Counting n³ FLOPs for an n×n product halved the peak and doubled every MFU.
    monkeypatch.setattr(bench, "steps_per_sample", lambda batch=16: 1)
    monkeypatch.setattr(bench, "median_time", lambda *args: 0.5)
    clock = iter(range(100))  # the second of warm-up products passes at once
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert bench.measure_matmul_tflops("float32", 64) == pytest.approx(2 * 64**3 / 0.5 / 1e12)


def test_a_failed_flop_count_keeps_the_measurement(monkeypatch):
    def broken(*args):
        raise TypeError("no count")

    monkeypatch.setattr(bench.flops, "count", broken)
    assert math.isnan(bench._count_flops(lambda x: x, 1.0))


def test_bench_runs_without_tfds_grain_or_ml_collections(tmp_path):
    """The GPU machine's image has none of them: the bench must neither import nor need them."""
    script = (
        "import runpy, sys\n"
        "for name in ('grain', 'tensorflow', 'tensorflow_datasets', 'ml_collections'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        f"sys.argv = ['bench', *{list(TINY)!r}, '--crop=128', '--what=train,forward',\n"
        f"            '--time_init', '--json={tmp_path / 'b.json'}']\n"
        "runpy.run_module('pan_jax.bench', run_name='__main__')\n"
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [r["what"] for r in rows] == ["train", "forward"]
    assert not any("error" in r for r in rows), rows


def test_time_init_compares_the_host_and_the_devices_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(bench, "FLAGS", parse_bench_flags("--time_init"))
    calls, saved = [], []

    def fake_time(model, backbone, dtype, on_host):
        calls.append(on_host)
        if on_host is False:
            raise MemoryError("out of memory")
        return 7.0

    monkeypatch.setattr(bench, "time_train_init", fake_time)
    report: dict = {}
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
    bench.time_train_inits(report, lambda: saved.append(dict(report)))
    # A training run's own choice first, saved before the devices' init may be cut short.
    assert calls == [None, False]
    assert saved[0] == {"train_init_s": 7.0}
    assert report["train_init_on_devices_error"] == "MemoryError: out of memory"
    calls.clear()
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "cpu")
    bench.time_train_inits({}, lambda: None)
    assert calls == [None]  # on a CPU the host is the device


def test_bench_gpu_script_checks_that_compiling_ahead_is_reused():
    with open(os.path.join(ROOT, "launch", "bench_gpu.sh")) as f:
        check = re.search(r"timeout 60 python3 - <<'PY'.*?\n(.*?)\nPY\n", f.read(), re.S).group(1)
    result = run_python(check)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 compile(s) of the step, reused" in result.stdout


def test_bench_gpu_script_leaves_its_figures_and_their_markdown(tmp_path):
    """launch/bench_gpu.sh end to end on this CPU, two parts on a tiny setting: what a device
    call brings back (at most 8 files) holds every figure, and the markdown of the docs."""
    out = tmp_path / "out"
    # The parts' own --batch=16,max, within an assumed 1 GiB device (the largest batch: 24).
    tiny = "--backbone=resnet18 --crop=128 --dtype=float32 --steps=1 --warmup=0"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",  # python3
        "BENCH_PARTS": "pan bn_moments",
        "BENCH_BASELINE": "previous",  # the A/B's baseline: the previous call's smp part
        "BENCH_EXTRA_ARGS": f"{tiny} --peak_tflops=1 --device_memory_gb=1",
    }
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "bench_gpu.sh"), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["bench.json", "bench.log", "bench.md"]
    parts = json.loads((out / "bench.json").read_text())
    assert list(parts) == ["pan", "bn_moments"]  # no baseline part: BENCH_BASELINE=previous
    at_16, largest = parts["pan"]["results"]
    assert (at_16["impl"], at_16["batch"]) == ("pan_jax pan", 16) and at_16["images_per_s"] > 0
    assert largest["batch"] == at_16["largest_batch_estimate"] > 16, largest
    assert largest["largest_batch_from"] == 16 and largest["images_per_s"] > 0
    # The estimate holds: the step at that batch plans within 90% of the assumed device.
    assert largest["compiled_peak_gb"] <= 0.9 * 1
    assert parts["bn_moments"]["args"]["bn_moments"] == "two_pass"
    markdown = (out / "bench.md").read_text()
    assert "| pan_jax `pan` R18 | train | 16 |" in markdown
    assert f"| pan_jax `pan` R18 | train | {largest['batch']} (largest) |" in markdown
    assert "| pan_jax `pan_smp` R18, `--bn_moments=two_pass` | train | 16 |" in markdown
    assert "A training run's initialisation of `pan` (`train.create_state`): " in markdown
    log = (out / "bench.log").read_text()
    assert "1 compile(s) of the step, reused" in log
    assert f"largest batch: {largest['batch']}, from the memory plan at batch 16" in log


@pytest.mark.parametrize("baseline", ["", "previous"])
def test_bench_gpu_script_runs_the_ab_baseline_unless_the_previous_call_holds_it(
    tmp_path, baseline
):
    # No time left for any part: each part, and the baseline it asks for, is a skipped line.
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "BENCH_PARTS": "bn_moments",
        "BENCH_BUDGET_S": "0",
        "BENCH_BASELINE": baseline,
    }
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "bench_gpu.sh"), str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = re.findall(r"^skipped (\w+):", result.stdout, re.M)
    assert skipped == (["bn_moments"] if baseline == "previous" else ["baseline", "bn_moments"])
