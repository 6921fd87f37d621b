"""Sound-of-Pixels baseline and the visual encoders: shapes, ranges, pooling, weight loading."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from models.sop import SoundOfPixels
from models.visual import MotionEncoder, ObjectEncoder
from training.factory import PRESETS, build_model


def test_sop_shapes_and_swap_with_iquery(small_kwargs, make_batch) -> None:
    sop = SoundOfPixels(n_rows=32, n_frames=32, ngf=8, unet_depth=5, n_channels=8,
                        obj_dim=small_kwargs["obj_dim"]).eval()
    batch = make_batch(small_kwargs, b=2, q=3)
    batch["query_pad"][1, 2] = True
    with torch.no_grad():
        masks = sop(**batch)  # the same keyword call as IQuery.forward
        alone = sop(batch["x"], batch["obj_feats"])
    assert masks.shape == (2, 3, 32, 32)
    assert masks.min() >= 0 and masks.max() <= 1
    assert (masks[1, 2] == 0).all()
    torch.testing.assert_close(masks[0], alone[0])
    # Different objects give different masks.
    assert (masks[0, 0] - masks[0, 1]).abs().max() > 1e-4


def test_sop_cpu_preset() -> None:
    sop = build_model("cpu", arch="sop").eval()
    rows, frames = PRESETS["cpu"]["n_rows"], PRESETS["cpu"]["n_frames"]
    with torch.no_grad():
        masks = sop(torch.rand(1, 1, rows, frames), torch.randn(1, 2, 512))
    assert masks.shape == (1, 2, rows, frames)


def test_object_encoder_max_pools_frames() -> None:
    torch.manual_seed(0)
    enc = ObjectEncoder(obj_dim=64).eval()
    frames = torch.randn(2, 3, 3, 112, 112)  # (B, Nf, 3, H, W) at the small crop size
    with torch.no_grad():
        feats = enc(frames)
        per_frame = torch.stack([enc(frames[:, i:i + 1]) for i in range(3)], dim=1)
    assert feats.shape == (2, 64)
    torch.testing.assert_close(feats, per_frame.amax(dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_object_encoder_loads_local_weights(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    state = ref.state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(state, path)  # a user's torchvision-style file
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    enc = ObjectEncoder(obj_dim=16)
    enc.load_torchvision_weights(path)
    torch.testing.assert_close(enc.backbone.conv1.weight, ref.conv1.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="suffix|must end"):
        enc.load_torchvision_weights(tmp_path / "weights.bin")


def test_motion_encoder_tokens() -> None:
    enc = MotionEncoder(motion_dim=48, base_channels=8, n_stages=3).eval()
    with torch.no_grad():
        tokens = enc(torch.randn(2, 3, 16, 64, 64))
    assert tokens.shape == (2, 16 // 4, 48)
    assert torch.isfinite(tokens).all()
