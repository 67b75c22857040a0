"""PyTorch checkpoints ↔ Flax variables: ImageNet ResNets, SMP PAN models, pretrained loading.

    variables = convert.from_smp(smp_model.state_dict())  # for models.create("pan_smp")
    state_dict = convert.to_smp(variables)  # smp.PAN(...).load_state_dict(strict=True)
    backbone_vars, arch = convert.from_imagenet("resnet101s.safetensors")  # models.ResNet(**arch)
    variables, report = convert.load_pretrained(variables, path, "timm", model=model)
    variables, report = convert.load_pretrained(variables, "imagenet", "timm", model=model)

From the command line (writes a directory that `checkpointing.load_variables` reads and training
can start from with kind "pan_jax"):

    python -m pan_jax.convert --from=timm --input=resnet101s.safetensors --output=DIR
    python -m pan_jax.convert --from=smp --input=smp_pan.pth --output=DIR
    python -m pan_jax.convert --from=timm --input=hf-hub:timm/resnet101s.gluon_in1k --output=DIR

Files: .safetensors are read without torch; .pth/.pt/.bin with `torch.load(weights_only=True)`;
"hf-hub:OWNER/REPO[/FILE]" and URLs are downloaded once into a local cache (`download`).
"""

from pan_jax.convert.core import (
    ConversionError,
    check_against,
    flax_to_torch,
    read_state_dict,
    to_numpy,
    torch_to_flax,
)
from pan_jax.convert.download import DownloadError
from pan_jax.convert.imagenet import (
    describe,
    detect_resnet,
    from_imagenet,
    resnet_rules,
    resnet_variant,
)
from pan_jax.convert.pretrained import (
    PRETRAINED_KINDS,
    PretrainedReport,
    fetch_pretrained,
    load_pretrained,
)
from pan_jax.convert.smp import SMP_RULES, from_smp, smp_spec, to_smp

__all__ = [
    "PRETRAINED_KINDS",
    "SMP_RULES",
    "ConversionError",
    "DownloadError",
    "PretrainedReport",
    "check_against",
    "describe",
    "detect_resnet",
    "fetch_pretrained",
    "flax_to_torch",
    "from_imagenet",
    "from_smp",
    "load_pretrained",
    "read_state_dict",
    "resnet_rules",
    "resnet_variant",
    "smp_spec",
    "to_numpy",
    "to_smp",
    "torch_to_flax",
]
