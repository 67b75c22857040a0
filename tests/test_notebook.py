"""The Colab notebook runs top to bottom (nbclient) against a checkpoint made here."""

import base64
import importlib.util
import io
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import types

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from pan_jax import checkpointing, evaluate, models
from pan_jax.models import random_variables

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "pan_jax_colab.ipynb"


def run_notebook(directory: pathlib.Path) -> tuple[str, str, list[str]]:
    """Runs every cell in `directory` (a failing cell raises CellExecutionError, with its
    traceback): the text, markdown and PNG figures (base64) it output."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(directory)}},
    )
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    markdown = "".join(out.get("data", {}).get("text/markdown", "") for out in outputs)
    figures = [out["data"]["image/png"] for out in outputs if "image/png" in out.get("data", {})]
    return text, markdown, figures


def test_notebook_runs(tmp_path, monkeypatch):
    # A workdir as a run leaves it: weights, the resolved config, an evaluation report.
    workdir = tmp_path / "run"
    spec = {"name": "pan", "backbone": "resnet18", "num_classes": 13, "overrides": {}}
    model = models.create("pan", num_classes=13, backbone="resnet18")
    checkpointing.save_variables(workdir, random_variables(model), spec)
    (workdir / "config.json").write_text(
        json.dumps(
            {"data": {"name": "pan_synthetic", "num_classes": 13}, "eval": {"mode": "whole"}}
        )
    )
    confusion = np.diag(np.arange(13, dtype=np.int64) * 10)
    confusion[1, 2] = 30
    report = {
        "iou": np.r_[np.nan, np.ones(12) * 0.5],
        "accuracy": np.ones(13),
        "miou": 0.5,
        "pixel_accuracy": 0.9,
        "mean_accuracy": 0.8,
        "confusion_matrix": confusion,
        "num_images": 12,
        "mode": "whole",
        "scales": [1.0],
        "flip": False,
    }
    names = evaluate.class_names_for("pan_synthetic", 13)
    evaluate.write_report(workdir, report, names)

    monkeypatch.setenv("PAN_JAX_CHECKPOINT", str(workdir))
    monkeypatch.setenv("PAN_JAX_IMAGE", "")
    monkeypatch.setenv("PAN_JAX_FLIP", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures
    text, markdown, figures = run_notebook(tmp_path)
    assert "pan / resnet18, 13 classes" in text and "classes present:" in text
    assert "| 1 | disk | 50.00 |" in markdown
    assert len(figures) == 2  # image/prediction/overlay, and the per-class IoU bars
    assert Image.open(io.BytesIO(base64.b64decode(figures[0]))).size[0] > 500


def test_without_a_checkpoint_the_notebook_trains_and_evaluates_the_demo(tmp_path, monkeypatch):
    # A newcomer in Colab has no checkpoint: the notebook runs the README's demo (shortened here
    # to 2 steps on the tiny synthetic set), evaluates it, and shows that run.
    flags = [
        "--config.num_train_steps=2",
        "--config.warmup_steps=0",
        "--config.data.name=pan_synthetic/tiny",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
    ]
    monkeypatch.setenv("PAN_JAX_CHECKPOINT", "")
    monkeypatch.setenv("PAN_JAX_DEMO_FLAGS", " ".join(flags))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    text, markdown, _ = run_notebook(tmp_path)
    workdir = tmp_path / "runs" / "demo"
    assert "training finished at step 2" in text and f"checkpoint: {workdir}" in text
    assert "pan / resnet18, 13 classes, step 2, dataset pan_synthetic/tiny" in text
    assert (workdir / evaluate.REPORT_JSON).exists()
    assert "| 0 | background |" in markdown  # the demo's own evaluation report


@pytest.mark.parametrize("accelerator", ["gpu", "tpu", None])
def test_the_install_cell_clones_the_repository_with_a_matching_jax(
    tmp_path, monkeypatch, accelerator
):
    # Where pan_jax is not importable (a fresh Colab runtime): clone (not into ./pan_jax, which
    # would shadow the package after a restart), then one pip install of the checkout and, on a
    # GPU or a TPU, jax's plugin of the jax that requirements.txt asks for.
    has_gpu = accelerator == "gpu"
    exists = os.path.exists  # a TPU VM's chips (v5e and later: /dev/vfio/0)
    monkeypatch.setattr(
        os.path, "exists", lambda p: (p == "/dev/vfio/0" and accelerator == "tpu") or exists(p)
    )
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (install,) = [c.source for c in notebook.cells if "PAN_JAX_REPO, " in c.source]
    commands = []

    def clone_or_install(command, check):
        commands.append(command)
        if command[:2] == ["git", "clone"]:  # the checkout, as far as the cell reads it
            os.makedirs(command[-1])
            shutil.copy(pathlib.Path(__file__).parents[1] / "requirements.txt", command[-1])

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(subprocess, "run", clone_or_install)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if has_gpu else None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    cell_1 = {"os": os, "CHECKPOINT": "", "IMAGE": ""}
    with pytest.raises(RuntimeError, match="set PAN_JAX_REPO in the parameters cell"):
        exec(install, {**cell_1, "PAN_JAX_REPO": ""})
    repo = "https://example.org/pan_jax.git"
    exec(install, {**cell_1, "PAN_JAX_REPO": repo})
    clone, pip = commands
    assert clone == ["git", "clone", "-q", "--depth=1", repo, "pan_jax_repo"]
    requirements = (pathlib.Path(__file__).parents[1] / "requirements.txt").read_text()
    (pin,) = [line for line in requirements.splitlines() if line.startswith("jax>=")]
    plugin = {"gpu": "jax[cuda12]", "tpu": "jax[tpu]"}.get(accelerator)
    extra = [pin.replace("jax", plugin, 1)] if plugin else []  # e.g. jax[cuda12]>=0.10,<0.12
    assert pip == [sys.executable, "-m", "pip", "install", "-q", "-e", "pan_jax_repo", *extra]
    assert sys.path[0] == str(tmp_path / "pan_jax_repo")
    # Run again (after a failed pip install, or a restart): the checkout is there, git clone
    # would refuse to clone into it.
    commands.clear()
    exec(install, {**cell_1, "PAN_JAX_REPO": repo})
    assert commands == [pip]


def test_the_parameters_default_to_a_quick_single_scale_run(monkeypatch):
    # Without PAN_JAX_* variables: the demo (no checkpoint), its latest step, one scale, no flip
    # (multi-scale inference is 6x slower, or more, on a Colab CPU).
    for name in os.environ:
        if name.startswith("PAN_JAX_"):
            monkeypatch.delenv(name)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c.source for c in notebook.cells if "MULTISCALE = " in c.source]
    parameters: dict = {}
    exec(cell, parameters)
    assert (parameters["CHECKPOINT"], parameters["IMAGE"], parameters["PAN_JAX_REPO"]) == ("",) * 3
    assert parameters["STEP"] is None and parameters["DEMO_FLAGS"] == []
    assert parameters["MULTISCALE"] is False and parameters["FLIP"] is False
    monkeypatch.setenv("PAN_JAX_STEP", "300")
    monkeypatch.setenv("PAN_JAX_MULTISCALE", "1")
    monkeypatch.setenv("PAN_JAX_DEMO_FLAGS", "--config.seed=1 '--config.data.name=a b'")
    exec(cell, parameters)
    assert parameters["STEP"] == 300 and parameters["MULTISCALE"] is True
    assert parameters["DEMO_FLAGS"] == ["--config.seed=1", "--config.data.name=a b"]


def test_a_failed_training_stops_the_notebook_there():
    # The demo's training or evaluation failing must stop at its own cell, not at loading a
    # checkpoint that is not there.
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c.source for c in notebook.cells if "def run_main(" in c.source]
    namespace = {
        "os": os,
        "shlex": shlex,
        "subprocess": subprocess,
        "sys": types.SimpleNamespace(executable="false"),  # exits 1 whatever its arguments
        "CHECKPOINT": "a checkpoint",  # the cell only defines run_main
        "DEMO_FLAGS": [],
    }
    exec(cell, namespace)
    with pytest.raises(RuntimeError, match="exited with status 1"):
        namespace["run_main"]("--config=configs/demo.py")
