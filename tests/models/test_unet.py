"""AudioUNet.mix: the per-query channel sums of the audio embedding, computed through the outer
layer's weights, equal the sums over the embedding itself (mix_by_embedding: the full
embedding, then an einsum; values and every gradient)."""

import pytest
import torch

from models.unet import AudioUNet


@pytest.mark.parametrize(("b", "q"), [(1, 1), (1, 3), (3, 2)])
def test_mix_equals_the_sum_over_the_embedding(b: int, q: int) -> None:
    torch.manual_seed(0)
    unet = AudioUNet(out_channels=8, ngf=4, depth=4, token_stride=4)
    with torch.no_grad():
        unet.up[0].bias.normal_()  # a bias that is not zero, so its sum is checked too
    x = torch.rand(b, 1, 32, 16)
    coeffs = torch.randn(b, q, 8)
    top, _ = unet(x)
    assert top.shape == (b, 8, 16, 8)

    outs, grads = [], []
    for fn in (unet.mix, unet.mix_by_embedding):
        t = top.detach().clone().requires_grad_(True)
        c = coeffs.clone().requires_grad_(True)
        unet.zero_grad()
        out = fn(t, c)
        # A loss that weighs every output bin differently, so no gradient term can cancel.
        (out * torch.linspace(-1, 2, out.numel()).reshape(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad, c.grad, unet.up[0].weight.grad.clone(),
                      unet.up[0].bias.grad.clone()])
    assert outs[0].shape == (b, q, 32, 16)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mix_under_bf16_autocast_stays_close() -> None:
    torch.manual_seed(1)
    unet = AudioUNet(out_channels=8, ngf=4, depth=4, token_stride=4)
    top, _ = unet(torch.rand(2, 1, 32, 16))
    coeffs = torch.randn(2, 3, 8)
    with torch.no_grad():
        want = unet.mix_by_embedding(top, coeffs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = unet.mix(top, coeffs).float()
    # bfloat16 keeps 8 bits of mantissa: a relative error of a few 1e-3 of the logits' scale.
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_mix_of_no_queries_is_empty() -> None:
    unet = AudioUNet(out_channels=8, ngf=4, depth=4, token_stride=4)
    top, _ = unet(torch.rand(2, 1, 32, 16))
    assert unet.mix(top, torch.zeros(2, 0, 8)).shape == (2, 0, 32, 16)
