"""Model presets and the name -> model factory (kept out of models/, which has no config).

`paper` follows the iQuery paper; `cpu` is sized by measurement on a 2-core CPU (see
docs/MODELS.md and scripts/bench_model.py for the numbers behind each choice).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.iquery import IQuery
from models.sop import SoundOfPixels

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "n_rows": 256, "n_frames": 256, "ngf": 64, "unet_depth": 7, "token_stride": 16,
        "d_model": 256, "n_heads": 8, "d_ffn": 1024, "n_motion_layers": 1, "n_audio_layers": 3,
        "mask_dim": 32, "n_classes": 12, "n_queries": 16, "obj_dim": 512, "motion_dim": 512,
        "dropout": 0.1},
    "cpu": {
        "n_rows": 128, "n_frames": 64, "ngf": 16, "unet_depth": 6, "token_stride": 16,
        "d_model": 128, "n_heads": 4, "d_ffn": 512, "n_motion_layers": 1, "n_audio_layers": 3,
        "mask_dim": 32, "n_classes": 12, "n_queries": 16, "obj_dim": 512, "motion_dim": 512,
        "dropout": 0.1},
}

ARCHS: dict[str, type[nn.Module]] = {"iquery": IQuery, "sop": SoundOfPixels}

# The arguments SoundOfPixels shares with IQuery (the rest of a preset does not apply to it).
_SOP_KEYS = ("n_rows", "n_frames", "ngf", "unet_depth", "obj_dim")


def preset_kwargs(preset: str, arch: str = "iquery", **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of `arch` for `preset`, with overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    base = dict(PRESETS[preset])
    if arch == "sop":
        # Its audio channels play iQuery's mask_dim: one override sizes both alike.
        base = ({k: base[k] for k in _SOP_KEYS}
                | {"n_channels": overrides.pop("mask_dim", base["mask_dim"])})
    return base | overrides


def build_model(preset: str, arch: str = "iquery", **overrides: Any) -> nn.Module:
    """Build `arch` ("iquery" or "sop") with the sizes of `preset` ("paper" or "cpu");
    keyword overrides replace single constructor arguments."""
    return ARCHS[arch](**preset_kwargs(preset, arch, **overrides))
