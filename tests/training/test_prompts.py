"""Audio prompts (training/prompts.py): prompt fine-tuning through the module's own code path
(prepare -> optimizers -> steps on held-out mixtures) moves only the prompt rows; `full` mode
moves the network; the held-out sampler always includes a prompt id; the derangement moves
every id; `evaluate` scores the val pairs for choices between fine-tuned models."""

import json

import numpy as np
import pytest
import torch

from models.checkpoint import save_checkpoint
from training.evaluate import split_pairs
from training.mixdata import SoloClip
from training.prompts import (
    HeldOutSampler,
    RowUnion,
    derangement,
    main,
    make_finetune_optimizers,
    prepare,
    remap,
    trainable_fraction,
)
from training.train import make_model, to_tensors, train_step

SMALL = {"ngf": 8, "d_model": 32, "n_heads": 2, "d_ffn": 64, "obj_dim": 16, "motion_dim": 8,
         "n_classes": 4, "n_queries": 6}


def clips(n_classes: int = 4, per_class: int = 2) -> list[SoloClip]:
    rng = np.random.default_rng(0)
    out = []
    for c in range(n_classes):
        for i in range(per_class):
            audio = rng.standard_normal(11025).astype(np.float32) * 0.1 * (c + 1)
            out.append(SoloClip(f"c{c}_{i}", f"class{c}", c, audio,
                                rng.standard_normal(16).astype(np.float32),
                                rng.standard_normal((8, 8)).astype(np.float16)))
    return out


def run_steps(mode: str, n_steps: int = 3, deep: bool = False):
    torch.manual_seed(0)
    model = make_model("iquery", "cpu", **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new_ids = prepare(model, 1, mode, deep)
    before_prompt = model.prompt_embeds[0].detach().clone()
    sampler = HeldOutSampler(remap(clips(), {3: new_ids[0]}), model.n_frames, new_ids, seed=0)
    opts = make_finetune_optimizers(model, mode, 1e-2, 1e-3, 1e-3)
    model.train()
    for _ in range(n_steps):
        t = to_tensors(sampler.sample(2), model.n_rows, torch.device("cpu"))
        assert (t["class_ids"] == new_ids[0]).any(1).all()  # every mixture holds the prompt
    for _ in range(n_steps):
        train_step(model, opts, sampler, 2, model.n_rows, torch.device("cpu"))
    return model, before, new_ids, before_prompt


def test_prompt_finetuning_changes_only_the_prompt_rows():
    model, before, new_ids, before_prompt = run_steps("prompt")
    assert new_ids == [6]
    after = model.state_dict()
    prompt_keys = [k for k in after if k.startswith("prompt_embeds.")]
    assert prompt_keys == ["prompt_embeds.0"]
    for k, v in before.items():  # every original tensor, batch-norm statistics included
        assert torch.equal(v, after[k]), f"{k} changed during prompt fine-tuning"
    assert not torch.allclose(after["prompt_embeds.0"], before_prompt)  # it did train
    n_train, n_all = trainable_fraction(model)
    assert n_train == 32 and n_all > 1000 * n_train


def test_deep_prompt_finetuning_trains_only_the_rows_and_their_offsets():
    model, before, new_ids, before_prompt = run_steps("prompt", deep=True)
    after = model.state_dict()
    new_keys = sorted(set(after) - set(before))
    assert new_keys == ["prompt_embeds.0", "prompt_offsets.0"]
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed during deep prompt fine-tuning"
    assert not torch.allclose(after["prompt_embeds.0"], before_prompt)
    assert after["prompt_offsets.0"].abs().amax(-1).gt(0).all()  # every layer's vector moved
    n_train, _ = trainable_fraction(model)
    assert n_train == 32 * (1 + len(model.audio_self) + 1)


def test_deep_prompt_offsets_take_their_own_learning_rate():
    torch.manual_seed(0)
    model = make_model("iquery", "cpu", **SMALL)
    ids = prepare(model, 1, "prompt", deep=True)
    (opt,) = make_finetune_optimizers(model, "prompt", 1e-2, 1e-3, 1e-3, lr_offsets=0.0)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 0.0]
    assert opt.param_groups[1]["params"] == list(model.prompt_offsets)
    start = model.prompt_embeds[0].detach().clone()
    sampler = HeldOutSampler(remap(clips(), {3: ids[0]}), model.n_frames, ids, seed=0)
    model.train()
    for _ in range(2):
        train_step(model, [opt], sampler, 2, model.n_rows, torch.device("cpu"))
    assert not torch.allclose(model.prompt_embeds[0], start)  # the row trains
    assert model.prompt_offsets[0].abs().max() == 0  # its offsets, at LR 0, stay at zero
    # Without lr_offsets both go at the rows' LR, as before.
    (opt,) = make_finetune_optimizers(model, "prompt", 1e-2, 1e-3, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-2]


def test_full_finetuning_moves_the_network():
    model, before, _, _ = run_steps("full", n_steps=1)
    after = model.state_dict()
    assert not torch.equal(before["mask_mlp.0.weight"], after["mask_mlp.0.weight"])
    assert trainable_fraction(model)[0] == trainable_fraction(model)[1]


@pytest.mark.parametrize("mode", ["decoder", "unet"])
def test_split_modes_move_only_their_half(mode):
    model, before, _, before_prompt = run_steps(mode, n_steps=2)
    after = model.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(v, after[k])}
    in_unet = {k for k in moved if k.startswith("unet.")}
    if mode == "decoder":  # the U-Net, its batch-norm statistics included, stays as it was
        assert not in_unet and "mask_mlp.0.weight" in moved
    else:
        assert in_unet and moved == in_unet
    assert not torch.allclose(after["prompt_embeds.0"], before_prompt)
    n_train, n_all = trainable_fraction(model)
    assert 32 < n_train < n_all


def test_derangement_moves_every_id():
    p = derangement(12, seed=0)
    assert sorted(p) == list(range(12)) and all(a != b for a, b in enumerate(p))


def test_held_out_sampler_on_three_source_mixtures():
    sampler = HeldOutSampler(clips(), 32, [3], n_mix=3, seed=0)
    ids = sampler.sample(16)["class_ids"]
    assert ids.shape == (16, 3)
    for row in ids:  # three different classes, the held-out one among them, in any slot
        assert len(set(row.tolist())) == 3 and 3 in row
    assert {int(np.flatnonzero(row == 3)[0]) for row in ids} == {0, 1, 2}


def test_finetune_cli_refuses_fewer_than_two_sources(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--data", str(tmp_path), "--init", str(tmp_path / "x"),
              "--classes", "violin", "--steps", "1", "--n-mix", "1", "--out", str(tmp_path)])
    assert "--n-mix must be >= 2" in capsys.readouterr().err


def test_finetune_cli_refuses_offsets_lr_without_deep_prompts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--data", str(tmp_path), "--init", str(tmp_path / "x"),
              "--classes", "violin", "--steps", "1", "--lr-offsets", "1e-2",
              "--out", str(tmp_path)])
    assert "--lr-offsets sets deep prompts' LR" in capsys.readouterr().err


def small_inputs(class_ids: list[int], n_frames: int, n_rows: int):
    torch.manual_seed(1)
    q = len(class_ids)
    return (torch.randn(1, 1, n_rows, n_frames), torch.randn(1, q, SMALL["obj_dim"]),
            torch.tensor([class_ids]), torch.randn(1, q, 4, SMALL["motion_dim"]),
            torch.zeros(1, q, 4, dtype=torch.bool), torch.zeros(1, q, dtype=torch.bool))


def test_row_union_joins_the_rows_of_a_prompt_class():
    torch.manual_seed(0)
    model = make_model("iquery", "cpu", **SMALL).eval()
    ids = prepare(model, 3, "prompt")  # one held-out class, three rows: 6, 7, 8
    with torch.no_grad():  # rows apart, so that their masks differ
        model.prompt_embeds[0].add_(torch.randn_like(model.prompt_embeds[0]))
    x, obj, _, motion, mpad, _ = small_inputs([1, 6], model.n_frames, model.n_rows)
    # The same queries as the union decodes: class 1 once, each of the prompt's rows once.
    direct = model(x, obj[:, [0, 1, 1, 1]], torch.tensor([[1, *ids]]), motion[:, [0, 1, 1, 1]],
                   mpad[:, [0, 1, 1, 1]], torch.zeros(1, 4, dtype=torch.bool))
    union = RowUnion(model, [ids[0]], 3)(x, obj, torch.tensor([[1, 6]]), motion, mpad,
                                         torch.zeros(1, 2, dtype=torch.bool))
    assert union.shape == (1, 2, model.n_rows, model.n_frames)
    torch.testing.assert_close(union[0, 0], direct[0, 0], atol=1e-5, rtol=1e-5)
    joined = 1 - (1 - direct[0, 1]) * (1 - direct[0, 2]) * (1 - direct[0, 3])
    torch.testing.assert_close(union[0, 1], joined, atol=1e-5, rtol=1e-5)
    assert (union[0, 1] >= direct[0, 1:].amax(0) - 1e-6).all()
    assert not torch.allclose(direct[0, 1], direct[0, 2])
    # A padded slot stays silent; one row is the model itself.
    pad = torch.tensor([[False, True]])
    assert RowUnion(model, [ids[0]], 3)(x, obj, torch.tensor([[1, 6]]), motion, mpad,
                                        pad)[0, 1].abs().max() == 0
    inputs = small_inputs([1, 6], model.n_frames, model.n_rows)
    torch.testing.assert_close(RowUnion(model, [6], 1)(*inputs), model(*inputs))


def test_row_union_finetuning_moves_only_the_prompt_rows():
    torch.manual_seed(0)
    model = make_model("iquery", "cpu", **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = prepare(model, 2, "prompt")[::2]  # one class, two rows
    start = model.prompt_embeds[0].detach().clone()
    union = RowUnion(model, ids, 2)
    sampler = HeldOutSampler(remap(clips(), {3: ids[0]}), model.n_frames, ids, seed=0)
    opts = make_finetune_optimizers(model, "prompt", 1e-2, 1e-3, 1e-3)
    union.train()
    for _ in range(3):
        train_step(union, opts, sampler, 2, model.n_rows, torch.device("cpu"))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"
    moved = (model.prompt_embeds[0] - start).abs().amax(1)
    assert (moved > 0).all()  # both rows train
    assert trainable_fraction(model)[0] == 2 * SMALL["d_model"]


def test_finetune_cli_refuses_zero_rows(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--data", str(tmp_path), "--init", str(tmp_path / "x"),
              "--classes", "violin", "--steps", "1", "--rows", "0", "--out", str(tmp_path)])
    assert "--rows must be >= 1" in capsys.readouterr().err


def test_evaluate_scores_the_val_pairs_holding_the_held_out_class(fake_data, tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m", make_model("iquery", "cpu", ngf=8).eval(), {})
    out = tmp_path / "ev"
    assert main(["evaluate", "--data", str(fake_data), "--classes", "banjo", "--pairs-from",
                 "val", "--seconds", "1.5", "--ckpt", f"m={tmp_path / 'm'}",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    holding = [p for p in split_pairs(fake_data, "val")
               if "banjo" in (p[0].class_name, p[1].class_name)]
    assert res["pairs_from"] == "val" and res["n_pairs"] == len(holding) > 0
    row = res["rows"]["m"]
    assert row["held_out"]["n"] == sum((a.class_name, b.class_name).count("banjo")
                                       for a, b in holding)
    assert row["all"]["n"] == 2 * len(holding) and np.isfinite(row["all"]["sdr"])
    assert row["others"]["n"] == row["all"]["n"] - row["held_out"]["n"]
    assert np.isclose(row["all"]["sdr"] * row["all"]["n"], row["held_out"]["sdr"]
                      * row["held_out"]["n"] + row["others"]["sdr"] * row["others"]["n"])
    # A class no val pair holds: a one-line error, nothing written.
    assert main(["evaluate", "--data", str(fake_data), "--classes", "violin", "--pairs-from",
                 "val", "--ckpt", f"m={tmp_path / 'm'}", "--out", str(tmp_path / "none")]) == 2
    assert "no val pair holds" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
