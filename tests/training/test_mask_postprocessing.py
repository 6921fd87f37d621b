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
