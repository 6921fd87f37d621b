"""iQuery network: shapes, mask range, gradient flow, boolean padding, one-pass decoding and
the audio-prompt freeze; the embeddings pass returns forward's masks."""

import pytest
import torch

from models.iquery import IQuery
from training.factory import PRESETS, build_model


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_preset_shapes_and_range(preset: str, make_batch) -> None:
    torch.manual_seed(0)
    model = build_model(preset).eval()
    kw = PRESETS[preset]
    batch = make_batch(kw, b=1, q=2, tm=4)
    with torch.no_grad():
        masks = model(**batch)
    assert masks.shape == (1, 2, kw["n_rows"], kw["n_frames"])
    assert torch.isfinite(masks).all()
    assert masks.min() >= 0 and masks.max() <= 1


def test_stages_shapes(small_kwargs, make_batch) -> None:
    model = IQuery(**small_kwargs).eval()
    batch = make_batch(small_kwargs)
    cache = model.encode_visual(batch["obj_feats"], batch["class_ids"], batch["motion"],
                                batch["motion_pad"], batch["query_pad"])
    assert cache.queries.shape == (2, 3, 32)
    tokens, top = model.encode_audio(batch["x"])
    assert tokens.shape == (2, (32 // 8) ** 2, 32)
    assert top.shape == (2, 2 * 8, 16, 16)  # the outer layer's input: 2 ngf at half size
    assert model.unet.embedding(top).shape == (2, 8, 32, 32)  # mask_dim at full size
    q = model.decode_queries(cache.queries, cache.query_pad, tokens)
    assert q.shape == (2, 3, 32)
    masks = model.predict_masks(q, top)
    assert masks.shape == (2, 3, 32, 32)
    torch.testing.assert_close(model.separate(batch["x"], cache), masks)


def test_gradient_reaches_every_parameter(small_kwargs, make_batch) -> None:
    torch.manual_seed(0)
    model = IQuery(**small_kwargs).train()
    batch = make_batch(small_kwargs, b=2, q=3)
    target = torch.rand(2, 3, 32, 32)
    (model(**batch) - target).abs().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_padded_motion_tokens_are_ignored(small_kwargs, make_batch) -> None:
    torch.manual_seed(0)
    model = IQuery(**small_kwargs).eval()
    batch = make_batch(small_kwargs, b=2, q=3, tm=6)
    batch["motion_pad"][0, 1, 3:] = True
    batch["motion_pad"][1, 2, :] = True  # a real query without any motion token
    with torch.no_grad():
        ref = model(**batch)
        changed = dict(batch, motion=batch["motion"].clone())
        n_pad = int(batch["motion_pad"].sum())
        changed["motion"][batch["motion_pad"]] = 1e3 * torch.randn(n_pad, 20)
        out = model(**changed)
        # The same values unpadded do change the output: the test can fail.
        unpadded = dict(changed, motion_pad=torch.zeros_like(batch["motion_pad"]))
        other = model(**unpadded)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (other - ref).abs().max() > 1e-3


def test_padded_queries_are_ignored_and_queries_interact(small_kwargs, make_batch) -> None:
    torch.manual_seed(0)
    model = IQuery(**small_kwargs).eval()
    batch = make_batch(small_kwargs, b=2, q=3)
    batch["query_pad"][:, 2] = True
    with torch.no_grad():
        ref = model(**batch)
        changed = {k: v.clone() for k, v in batch.items()}
        changed["obj_feats"][:, 2] += 5 * torch.randn(2, small_kwargs["obj_dim"])
        changed["motion"][:, 2] += 5
        changed["class_ids"][:, 2] = 99  # padded slots may hold anything, even invalid ids
        out = model(**changed)
        # Changing a real query changes the other real queries' masks (one-pass decoding).
        moved = {k: v.clone() for k, v in batch.items()}
        moved["obj_feats"][:, 1] += 5 * torch.randn(2, small_kwargs["obj_dim"])
        out_moved = model(**moved)
    torch.testing.assert_close(out[:, :2], ref[:, :2], rtol=0, atol=1e-6)
    assert (out[:, 2] == 0).all() and (ref[:, 2] == 0).all()
    assert (out_moved[:, 0] - ref[:, 0]).abs().max() > 1e-4


def test_forward_with_embeddings_matches_forward(small_kwargs, make_batch) -> None:
    torch.manual_seed(0)
    model = IQuery(**small_kwargs).eval()
    batch = make_batch(small_kwargs, b=2, q=3)
    batch["query_pad"][1, 2] = True
    with torch.no_grad():
        ref = model(**batch)
        masks, visual_q, audio_q = model.forward_with_embeddings(**batch)
        via_forward = model(**batch, return_embeddings=True)
        cache = model.encode_visual(batch["obj_feats"], batch["class_ids"], batch["motion"],
                                    batch["motion_pad"], batch["query_pad"])
        tokens, _ = model.encode_audio(batch["x"])
        decoded = model.decode_queries(cache.queries, cache.query_pad, tokens)
    torch.testing.assert_close(masks, ref, rtol=0, atol=0)
    assert visual_q.shape == audio_q.shape == (2, 3, small_kwargs["d_model"])
    torch.testing.assert_close(visual_q, cache.queries, rtol=0, atol=0)
    torch.testing.assert_close(audio_q, decoded, rtol=0, atol=0)
    for a, b in zip(via_forward, (masks, visual_q, audio_q), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float_padding_mask_rejected(small_kwargs, make_batch) -> None:
    model = IQuery(**small_kwargs)
    batch = make_batch(small_kwargs)
    batch["query_pad"] = batch["query_pad"].float()
    with pytest.raises(TypeError, match="bool"):
        model(**batch)


def test_invalid_class_id_rejected(small_kwargs, make_batch) -> None:
    model = IQuery(**small_kwargs)
    batch = make_batch(small_kwargs)
    batch["class_ids"][0, 0] = 16
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model(**batch)


def test_prompt_freeze(small_kwargs, make_batch) -> None:
    torch.manual_seed(0)
    model = IQuery(**small_kwargs)
    ids = model.add_prompts(2)
    assert ids == [16, 17]
    assert model.n_ids == 18
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_embeds.0"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    # Weight decay over every parameter: frozen ones have no gradient, so AdamW skips them.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    batch = make_batch(small_kwargs, b=2, q=2)
    batch["class_ids"] = torch.tensor([[16, 3], [17, 16]])
    for _ in range(2):
        opt.zero_grad()
        model(**batch).mean().backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k == "prompt_embeds.0":
            assert not torch.equal(after[k], v), "prompt rows did not train"
        else:
            assert torch.equal(after[k], v), f"{k} changed while frozen"
    # A second round freezes the first prompts too.
    assert model.add_prompts(1) == [18]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_embeds.1"]


def test_deep_prompts(tmp_path, small_kwargs, make_batch) -> None:
    """Deep prompts train only their own rows and offsets, leave every query-table class's
    masks unchanged, steer their own query's masks, and survive a checkpoint round trip."""
    from models.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = IQuery(**small_kwargs).eval()
    old = make_batch(small_kwargs, b=2, q=2)  # table classes only
    with torch.no_grad():
        ref = model(**old)
    assert model.add_prompts(1) == [16]  # a one-row group first: its offsets read as zero
    assert model.add_prompts(2, deep=True) == [17, 18]
    assert model.kwargs["deep_prompts"] == [False, True]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_embeds.1", "prompt_offsets.0"]
    table = model.offset_table()
    assert table.shape == (19, small_kwargs["n_audio_layers"] + 1, small_kwargs["d_model"])
    with torch.no_grad():
        model.prompt_offsets[0].normal_()
        torch.testing.assert_close(model(**old), ref, rtol=0, atol=0)
        deep = dict(old, class_ids=torch.tensor([[17, 3], [18, 5]]))
        before = model(**deep)
        model.prompt_offsets[0][:, -1].add_(1.0)  # the offset before the mask MLP
        assert not torch.allclose(model(**deep)[:, 0], before[:, 0])
    save_checkpoint(tmp_path / "deep", model)
    loaded, _ = load_checkpoint(tmp_path / "deep")
    assert loaded.kwargs["deep_prompts"] == [False, True]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**deep), model(**deep), rtol=0, atol=0)
    with pytest.raises(ValueError, match="deep_prompts"):
        IQuery(**small_kwargs, prompt_sizes=[1, 2], deep_prompts=[True])
