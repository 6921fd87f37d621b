"""Shared fixtures of the model tests: a tiny iQuery configuration and a matching batch."""

import pytest
import torch

SMALL = {"n_rows": 32, "n_frames": 32, "ngf": 8, "unet_depth": 5, "token_stride": 8,
         "d_model": 32, "n_heads": 4, "d_ffn": 64, "n_motion_layers": 1, "n_audio_layers": 2,
         "mask_dim": 8, "n_classes": 12, "n_queries": 16, "obj_dim": 24, "motion_dim": 20,
         "dropout": 0.0}


@pytest.fixture
def small_kwargs() -> dict:
    return dict(SMALL)


def _make_batch(kw: dict, b: int = 2, q: int = 3, tm: int = 5, seed: int = 0) -> dict:
    """Random inputs of IQuery.forward (no padding) for constructor arguments kw."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.rand(b, 1, kw["n_rows"], kw["n_frames"], generator=gen),
        "obj_feats": torch.randn(b, q, kw["obj_dim"], generator=gen),
        "class_ids": torch.randint(0, kw["n_classes"], (b, q), generator=gen),
        "motion": torch.randn(b, q, tm, kw["motion_dim"], generator=gen),
        "motion_pad": torch.zeros(b, q, tm, dtype=torch.bool),
        "query_pad": torch.zeros(b, q, dtype=torch.bool),
    }


@pytest.fixture
def make_batch():
    """The batch builder, as a fixture (test modules cannot import a conftest by name)."""
    return _make_batch
