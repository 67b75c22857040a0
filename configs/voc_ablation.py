"""The paper's VOC experiments, one row each: `--config=configs/voc_ablation.py:ROW`.

Every row trains with the protocol of configs/voc.py (train_aug, crop 512, batch 16, poly from
4e-3) and changes only the model, or for Table 5 the evaluation. `config.paper_miou_percent`
keeps the paper's val mIoU of the row; `--mode=eval` prints it next to the run's and writes it
into `eval_report.json`/`.md`. docs/reproduction.md lists the rows with their commands.

    python -m pan_jax.main --config=configs/voc_ablation.py:fpa_c333_ave --workdir=runs/t1_c333_ave
"""

from typing import Any

import ml_collections

from configs import voc

_SINGLE_SCALE = {"scales": (1.0,), "flip": False}
_MULTI_SCALE = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _fpa(kernels: tuple[int, ...], pooling: str, global_branch: bool) -> dict[str, Any]:
    return {"fpa_kernels": kernels, "fpa_pooling": pooling, "fpa_global_branch": global_branch}


# Row -> (model name, models.create overrides, eval overrides, the paper's val mIoU).
ROWS: dict[str, tuple[str, dict[str, Any], dict[str, Any], float]] = {
    # Table 1: FPA settings, with direct upsampling.
    "fcn": ("fcn", {}, _SINGLE_SCALE, 72.60),
    "fpa_se": ("fpa", {"fpa_attention": "se", "fpa_global_branch": False}, _SINGLE_SCALE, 75.74),
    "fpa_c333_max": ("fpa", _fpa((3, 3, 3), "max", False), _SINGLE_SCALE, 77.13),
    "fpa_c333_ave": ("fpa", _fpa((3, 3, 3), "avg", False), _SINGLE_SCALE, 77.54),
    "fpa_c333_max_gp": ("fpa", _fpa((3, 3, 3), "max", True), _SINGLE_SCALE, 77.29),
    "fpa_c333_ave_gp": ("fpa", _fpa((3, 3, 3), "avg", True), _SINGLE_SCALE, 77.61),
    "fpa_c357_max": ("fpa", _fpa((7, 5, 3), "max", False), _SINGLE_SCALE, 77.40),
    "fpa_c357_ave": ("fpa", _fpa((7, 5, 3), "avg", False), _SINGLE_SCALE, 78.19),
    "fpa_c357_max_gp": ("fpa", _fpa((7, 5, 3), "max", True), _SINGLE_SCALE, 77.03),
    "fpa_c357_ave_gp": ("fpa", _fpa((7, 5, 3), "avg", True), _SINGLE_SCALE, 78.37),
    # Table 2: other context modules on the same backbone.
    "psp": ("psp", {}, _SINGLE_SCALE, 76.82),
    "aspp": ("aspp", {}, _SINGLE_SCALE, 77.21),
    # Table 3: the GAU decoder alone.
    "gau_no_gp": ("gau", {"gau_global_attention": False}, _SINGLE_SCALE, 73.56),
    "gau_gp_1x1": ("gau", {"gau_low_kernel": 1}, _SINGLE_SCALE, 77.48),
    "gau_gp_3x3": ("gau", {"gau_low_kernel": 3}, _SINGLE_SCALE, 77.84),
    # Table 5: the whole PAN, single scale, multi-scale, multi-scale + flip.
    "pan": ("pan", {}, _SINGLE_SCALE, 79.38),
    "pan_ms": ("pan", {}, {"scales": _MULTI_SCALE, "flip": False}, 80.77),
    "pan_ms_flip": ("pan", {}, {"scales": _MULTI_SCALE, "flip": True}, 81.19),
}  # fmt: skip


def get_config(row: str = "") -> ml_collections.ConfigDict:
    if row not in ROWS:
        raise ValueError(
            f"configs/voc_ablation.py needs a row after the colon, e.g. "
            f"--config=configs/voc_ablation.py:fpa_c333_ave; got {row!r}, expected one of "
            f"{', '.join(ROWS)}"
        )
    name, model_overrides, eval_overrides, paper_miou = ROWS[row]
    config = voc.get_config()
    config.model.name = name
    for key, value in model_overrides.items():
        config.model.overrides[key] = value
    for key, value in eval_overrides.items():
        config.eval[key] = value
    config.paper_miou_percent = paper_miou
    return config
