"""scripts/mask_postprocessing.py's variants keep their promises on random masks."""

import torch


def test_variants_normalise_cap_soften_and_sharpen(load_script):
    torch.manual_seed(0)
    m = torch.rand(3, 40, 20) * 0.9 + 0.05
    v = load_script("mask_postprocessing").variants(m)
    total = m.sum(0)
    assert torch.equal(v["as predicted"], m)
    torch.testing.assert_close(v["normalised"].sum(0), torch.ones_like(total))
    assert (v["capped"].sum(0) <= 1 + 1e-5).all()
    assert (v["raised 0.5"] >= m).all() and (v["raised 0.75"] <= v["raised 0.5"]).all()
    for p in ("0.5", "0.75", "2"):
        torch.testing.assert_close(v[f"power {p}"].sum(0), torch.ones_like(total))
        torch.testing.assert_close(v[f"power {p}, capped"].sum(0), total.clamp(max=1))
    # Softening pulls the shares of the sources towards each other, sharpening apart.
    share = m / total
    spread = {p: (v[f"power {p}"] - 1 / 3).abs().mean() for p in ("0.5", "2")}
    assert spread["0.5"] < (share - 1 / 3).abs().mean() < spread["2"]


def test_oracle_gates_silence_and_solo_frames(load_script):
    torch.manual_seed(0)
    m = torch.rand(2, 16, 6) * 0.8 + 0.1
    refs = torch.randn(2, 16, 6, dtype=torch.complex64)
    refs[0, :, 1] = 0  # source 0 silent in frame 1, source 1 silent in frame 4
    refs[1, :, 4] = 1e-4 * refs[1, :, 4]
    v = load_script("mask_postprocessing").oracle_gates(m, refs, refs.sum(0))
    g, solo = v["oracle gate"], v["oracle gate, solo frames 1"]
    assert (g[0, :, 1] == 0).all() and (g[1, :, 4] == 0).all()
    keep = [0, 2, 3, 5]
    assert torch.equal(g[:, :, keep], m[:, :, keep])
    assert (solo[1, :, 1] == 1).all() and (solo[0, :, 4] == 1).all()
    assert (solo[0, :, 1] == 0).all() and torch.equal(solo[:, :, keep], m[:, :, keep])
