"""Mix-and-Separate on synthetic clips: a training step lowers the loss on a fixed batch, a
resumed run continues exactly like an uninterrupted one, sliding-window separation is an
identity for all-ones masks, the evaluation rows have the expected shape, and the auxiliary
contrastive loss (InfoNCE between audio-decoded and visual queries) ranks, ignores padding,
reaches the queries and leaves the plain step untouched at weight 0."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.spectral import HOP, model_input
from training.evaluate import irm, irm_grid, score_row, to_markdown
from training.mixdata import MixSampler, SoloClip
from training.separate import Query, motion_len, motion_window, separate_wave, window_starts
from training.train import (
    NonFiniteStep,
    PrecisionGuard,
    forward,
    forward_with_embeddings,
    info_nce,
    load_state,
    loss_weight,
    lr_factor,
    main,
    make_model,
    make_optimizers,
    mask_loss,
    mix_size,
    pick_precision,
    ratio_mask,
    save_state,
    set_lr,
    to_tensors,
    train_step,
)

SMALL = {"ngf": 8, "d_model": 32, "n_heads": 2, "d_ffn": 64, "obj_dim": 16, "motion_dim": 8}


def tone_clips(n_classes: int = 3, per_class: int = 2, seconds: float = 2.0) -> list[SoloClip]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 11025)) / 11025
    clips = []
    for c in range(n_classes):
        obj = rng.standard_normal(16).astype(np.float32)
        for i in range(per_class):
            f0 = 220 * 2 ** (c * 7 / 12 + 0.05 * i)
            audio = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in (1, 2, 3)) * 0.1
            env = (np.sin(2 * np.pi * (1 + c) * t) > 0).astype(np.float32)  # class rhythm
            motion = rng.standard_normal((int(seconds * 8), 8)).astype(np.float16)
            clips.append(SoloClip(f"c{c}_{i}", f"class{c}", c, (audio * env).astype(np.float32),
                                  obj, motion))
    return clips


def small_model(name: str = "iquery") -> nn.Module:
    kw = SMALL if name != "sop" else {"ngf": 8, "obj_dim": 16}
    return make_model(name, "cpu", **kw)


def test_sampler_shapes_and_distinct_classes():
    s = MixSampler(tone_clips(), n_frames=64, n_mix=3, seed=1)
    b = s.sample(4)
    assert b["sources"].shape == (4, 3, 63 * HOP)
    assert b["motion"].shape == (4, 3, motion_len(64), 8) and b["motion_pad"].dtype == bool
    assert all(len(set(row)) == 3 for row in b["class_ids"])


@pytest.mark.parametrize("name", ["iquery", "sop"])
def test_training_steps_lower_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = small_model(name)
    batch = to_tensors(MixSampler(tone_clips(), 64, seed=0).sample(4), model.n_rows,
                       torch.device("cpu"))
    opts = make_optimizers(model, 1e-3, 1e-3)
    model.train()
    with torch.no_grad():
        model.eval()
        before = mask_loss(forward(model, batch), batch["target"], batch["weight"]).item()
        model.train()
    for _ in range(8):
        loss = mask_loss(forward(model, batch), batch["target"], batch["weight"])
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    model.eval()
    with torch.no_grad():
        after = mask_loss(forward(model, batch), batch["target"], batch["weight"]).item()
    assert after < before


def test_training_input_is_the_engines_model_input():
    """to_tensors builds x from the warped magnitude it already has; it must stay exactly what
    the engine feeds the separator (spectral.model_input of the mixture's STFT)."""
    t = to_tensors(MixSampler(tone_clips(), 64, seed=0).sample(3), 128, torch.device("cpu"))
    torch.testing.assert_close(t["x"], model_input(t["spec_mix"], 128), rtol=0, atol=0)


def _step(model, opts, sampler):
    t = to_tensors(sampler.sample(2), model.n_rows, torch.device("cpu"))
    loss = mask_loss(forward(model, t), t["target"], t["weight"])
    for o in opts:
        o.zero_grad()
    loss.backward()
    for o in opts:
        o.step()


def test_resume_continues_exactly(tmp_path):
    clips = tone_clips()

    def fresh():
        torch.manual_seed(0)
        m = small_model()
        return m, make_optimizers(m, 1e-3, 1e-3), MixSampler(clips, 64, seed=3)

    m1, o1, s1 = fresh()
    for _ in range(3):
        _step(m1, o1, s1)
    m2, o2, s2 = fresh()
    _step(m2, o2, s2)
    save_state(tmp_path / "last", m2, o2, s2, {"step": 1, "note": "x"})
    m3, o3, s3 = fresh()
    torch.manual_seed(99)  # resume must restore the RNG, not rely on this one
    info = load_state(tmp_path / "last", m3, o3, s3)
    assert info["step"] == 1 and info["note"] == "x"
    for _ in range(2):
        _step(m3, o3, s3)
    for (k, a), b in zip(m1.state_dict().items(), m3.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs after resume")


def test_ema_is_the_moving_average_and_resumes_exactly(tmp_path):
    """--ema: the first update copies the weights, each next one is d * avg + (1 - d) * w,
    BatchNorm statistics included; a resumed run's average continues as if never stopped."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    clips, d = tone_clips(), 0.9

    def fresh():
        torch.manual_seed(0)
        m = small_model()
        ema = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
        return m, make_optimizers(m, 1e-3, 1e-3), MixSampler(clips, 64, seed=3), ema

    m1, o1, s1, e1 = fresh()
    seen = []
    for _ in range(3):
        _step(m1, o1, s1)
        e1.update_parameters(m1)
        seen.append({k: v.detach().clone() for k, v in m1.state_dict().items()
                     if v.is_floating_point()})
    for k, avg in e1.module.state_dict().items():
        if k in seen[0]:
            want = d * (d * seen[0][k] + (1 - d) * seen[1][k]) + (1 - d) * seen[2][k]
            torch.testing.assert_close(avg, want, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(
        e1.module.parameters(), m1.parameters(), strict=True)), "the average is the weights"

    m2, o2, s2, e2 = fresh()
    _step(m2, o2, s2)
    e2.update_parameters(m2)
    save_state(tmp_path / "last", m2, o2, s2, {"step": 1}, e2)
    m3, o3, s3, e3 = fresh()
    load_state(tmp_path / "last", m3, o3, s3, e3)
    assert int(e3.n_averaged) == 1
    for _ in range(2):
        _step(m3, o3, s3)
        e3.update_parameters(m3)
    for (k, a), b in zip(e1.module.state_dict().items(), e3.module.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs after resume")


class _Ones(nn.Module):
    """A stand-in separator whose every mask is 1: separation must return the mixture."""

    n_rows, n_frames = 32, 16

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x, obj, cls, motion, motion_pad, query_pad):
        assert motion.shape[2] == motion_len(16) and motion_pad.dtype == torch.bool
        return torch.ones(x.shape[0], obj.shape[1], *x.shape[2:])


def test_sliding_window_separation_is_identity_for_unit_masks():
    assert window_starts(40, 16) == [0, 8, 16, 24]
    assert window_starts(41, 16) == [0, 8, 16, 24, 25]
    assert window_starts(41, 16, hop=4) == [0, 4, 8, 12, 16, 20, 24, 25]
    wave = np.random.default_rng(0).standard_normal(12345).astype(np.float32) * 0.1
    q = Query(np.zeros(4, np.float32), 0, np.zeros((12, 3), np.float16))
    est = separate_wave(_Ones(), wave, [q, q])
    np.testing.assert_allclose(est, np.stack([wave, wave]), atol=1e-5)
    short = separate_wave(_Ones(), wave[:1000], [q])  # shorter than one window
    np.testing.assert_allclose(short[0], wave[:1000], atol=1e-5)


def test_motion_window_pads_past_the_video():
    tokens = np.arange(10, dtype=np.float32)[:, None]
    mot, pad = motion_window(tokens, start_frame=20, n_frames=64)
    first = round(20 * HOP / 11025 * 8)
    assert mot[0, 0] == first and pad.sum() == len(pad) - (10 - first)
    # A streaming window that starts before the clip: padded there, not wrapped to the end.
    mot, pad = motion_window(tokens, start_frame=-40, n_frames=64)
    before = -round(-40 * HOP / 11025 * 8)
    assert pad[:before].all() and not pad[before:before + 10].any()
    assert (mot[:before] == 0).all() and mot[before, 0] == 0 and mot[before + 1, 0] == 1


def test_irm_beats_mixture_and_table_shape():
    rng = np.random.default_rng(0)
    t = np.arange(22050) / 11025
    refs = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * rng.standard_normal(len(t))])
    item = {"name": "tone+noise", "classes": ["flute", "drum"], "refs": refs, "mix": refs.sum(0)}
    rows = {"Mixture": score_row([item], lambda it: np.stack([it["mix"]] * 2)),
            "IRM": score_row([item], irm), "IRM grid": score_row([item], irm_grid)}
    assert rows["IRM"]["sdr"] > rows["Mixture"]["sdr"] + 5
    # The 128-row grid blurs the tone into its noisy neighbours: an oracle, but a lower one;
    # on 512 rows (as many as bins) it is sharper.
    assert rows["Mixture"]["sdr"] + 3 < rows["IRM grid"]["sdr"] < rows["IRM"]["sdr"]
    fine = score_row([item], lambda it: irm_grid(it, 512))
    assert fine["sdr"] > rows["IRM grid"]["sdr"]
    assert rows["IRM"]["n_sources"] == 2
    per = rows["IRM"]["per_source"]  # each source's own scores, in the item's class order
    assert [p[:2] for p in per] == [["tone+noise", "flute"], ["tone+noise", "drum"]]
    assert np.mean([p[2] for p in per]) == pytest.approx(rows["IRM"]["sdr"])
    assert per[0][2] != per[1][2]
    md = to_markdown({"pairs": rows, "ensembles": {}, "n_pairs": 1, "n_ensembles": 0,
                      "seconds": 2.0})
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + len(rows)
    assert all(ln.count("|") == 6 for ln in lines)


# ------------------------------------------------------------- auxiliary contrastive loss
CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """One torch thread: two threads spinning against busy cores made a step 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _plain_step(model, opts, sampler, batch):
    """The Mix-and-Separate step as it was before the contrastive loss existed."""
    t = to_tensors(sampler.sample(batch), model.n_rows, CPU)
    loss = mask_loss(forward(model, t), t["target"], t["weight"])
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts:
        o.step()
    return loss


def test_info_nce_of_orthogonal_matched_pairs_is_the_closed_form():
    v = torch.eye(4)[None]  # (1, 4, 4): four orthogonal sources
    pad = torch.zeros(1, 4, dtype=torch.bool)
    # Logits 1/T on the diagonal, 0 elsewhere: -log(e^(1/T) / (e^(1/T) + 3)) both ways.
    for temp in (0.1, 0.5):
        expect = torch.log1p(3 * torch.exp(torch.tensor(-1 / temp)))
        torch.testing.assert_close(info_nce(3 * v, v, pad, temp), expect)  # norms do not count


def test_info_nce_is_lower_for_matched_than_for_shuffled_pairs():
    gen = torch.Generator().manual_seed(0)
    visual = torch.randn(2, 3, 16, generator=gen)
    audio = visual + 0.3 * torch.randn(2, 3, 16, generator=gen)
    pad = torch.zeros(2, 3, dtype=torch.bool)
    shuffled = audio.reshape(6, 16)[[1, 2, 0, 4, 5, 3]].reshape(2, 3, 16)  # no source kept
    matched, wrong = info_nce(audio, visual, pad), info_nce(shuffled, visual, pad)
    assert torch.isfinite(matched) and matched < 0.5 * wrong, (matched, wrong)


def test_info_nce_ignores_padded_queries():
    gen = torch.Generator().manual_seed(1)
    visual = torch.randn(2, 3, 16, generator=gen)
    audio = visual + 0.5 * torch.randn(2, 3, 16, generator=gen)
    pad = torch.zeros(2, 3, dtype=torch.bool)
    pad[1, 2] = True
    # The padded slot holds strong distractors: copies of another source's embeddings.
    visual[1, 2], audio[1, 2] = audio[0, 0], visual[0, 1]
    dense = info_nce(audio.reshape(1, 6, 16)[:, :5], visual.reshape(1, 6, 16)[:, :5],
                     torch.zeros(1, 5, dtype=torch.bool))
    torch.testing.assert_close(info_nce(audio, visual, pad), dense, rtol=0, atol=1e-6)
    # Had the slot counted, the value would move: the test can tell.
    assert abs(info_nce(audio, visual, torch.zeros_like(pad)) - dense) > 1e-2
    all_pad = torch.ones_like(pad)
    assert info_nce(audio, visual, all_pad) == 0


def test_padded_query_slot_leaves_the_model_contrastive_loss_unchanged(one_thread):
    torch.manual_seed(0)
    model = small_model().eval()
    t = to_tensors(MixSampler(tone_clips(), 64, seed=2).sample(3), model.n_rows, CPU)
    padded = dict(t)
    for k in ("obj", "class_ids", "motion", "motion_pad"):
        padded[k] = torch.cat([t[k], t[k].flip(0)[:, :1]], dim=1)  # a third, padded slot
    padded["query_pad"] = torch.zeros(3, 3, dtype=torch.bool)
    padded["query_pad"][:, 2] = True
    with torch.no_grad():
        m1, v1, a1 = forward_with_embeddings(model, t)
        m2, v2, a2 = forward_with_embeddings(model, padded)
    torch.testing.assert_close(m2[:, :2], m1, rtol=0, atol=1e-5)
    assert (m2[:, 2] == 0).all()
    torch.testing.assert_close(info_nce(a2, v2, padded["query_pad"]),
                               info_nce(a1, v1, t["query_pad"]), rtol=0, atol=1e-5)


def test_contrastive_step_is_finite_and_reaches_the_queries(one_thread):
    torch.manual_seed(0)
    model = small_model()
    opts = make_optimizers(model, 1e-3, 1e-3)
    sampler = MixSampler(tone_clips(), 64, seed=4)
    stats: dict[str, float] = {}
    loss = train_step(model, opts, sampler, 3, model.n_rows, CPU, contrastive_weight=0.5,
                      temperature=0.1, stats=stats)
    assert torch.isfinite(loss) and stats["contrastive"] > 0
    assert abs(loss.item() - (stats["mask"] + 0.5 * stats["contrastive"])) < 1e-5
    # The contrastive term on its own: gradients on both query paths, none on the mask head.
    model.zero_grad(set_to_none=True)
    t = to_tensors(sampler.sample(3), model.n_rows, CPU)
    _, visual, audio = forward_with_embeddings(model, t)
    info_nce(audio, visual, t["query_pad"]).backward()
    for name in ("query_embed.weight", "obj_proj.weight", "motion_cross.0.attn.v_proj.weight",
                 "audio_self.0.attn.v_proj.weight", "audio_cross.0.attn.q_proj.weight",
                 "audio_ffn.2.net.3.weight"):
        g = model.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert model.mask_mlp[0].weight.grad is None


def test_zero_contrastive_weight_is_the_plain_step_bit_for_bit(one_thread):
    def run(step):
        torch.manual_seed(0)
        model = small_model()
        opts = make_optimizers(model, 1e-3, 1e-3)
        sampler = MixSampler(tone_clips(), 64, seed=5)
        losses = [step(model, opts, sampler).item() for _ in range(2)]
        return losses, model.state_dict()

    ref = run(lambda m, o, s: _plain_step(m, o, s, 2))
    for kw in ({}, {"contrastive_weight": 0.0}, {"precision": "fp32"}):
        got = run(lambda m, o, s, kw=kw: train_step(m, o, s, 2, m.n_rows, CPU, **kw))
        assert got[0] == ref[0], kw
        for (k, a), b in zip(ref[1].items(), got[1].values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs ({kw})")
    on = run(lambda m, o, s: train_step(m, o, s, 2, m.n_rows, CPU, contrastive_weight=1.0))
    assert on[0][0] != ref[0][0]  # the term is really added when the weight is > 0


@pytest.mark.parametrize("name", ["iquery", "sop"])
def test_bf16_step_tracks_the_fp32_step_and_keeps_float32_weights(name, one_thread):
    def run(precision):
        torch.manual_seed(0)
        model = small_model(name)
        opts = make_optimizers(model, 1e-3, 1e-3)
        sampler = MixSampler(tone_clips(), 64, seed=5)
        loss = train_step(model, opts, sampler, 2, model.n_rows, CPU, precision=precision)
        return loss.item(), model

    ref, _ = run("fp32")
    got, model = run("bf16")
    assert got != ref  # autocast really ran in bfloat16 ...
    assert got == pytest.approx(ref, rel=0.05)  # ... on the same batch, to bf16 precision
    for k, w in model.state_dict().items():
        if w.is_floating_point():
            assert w.dtype == torch.float32 and torch.isfinite(w).all(), k


def test_a_step_with_nan_gradients_updates_nothing(one_thread):
    torch.manual_seed(0)
    model = small_model("iquery")
    opts = make_optimizers(model, 1e-3, 1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = next(model.parameters())
    p0 = p.detach().clone()
    hook = p.register_hook(lambda g: g * float("nan"))  # what the broken bf16 kernels return
    with pytest.raises(NonFiniteStep):
        train_step(model, opts, MixSampler(tone_clips(), 64, seed=5), 2, model.n_rows, CPU)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not o.state for o in opts)  # no optimizer moment saw the NaN
    hook.remove()
    train_step(model, opts, MixSampler(tone_clips(), 64, seed=5), 2, model.n_rows, CPU)
    assert not torch.equal(p.detach(), p0) and all(o.state for o in opts)  # a clean step steps


def test_precision_guard_falls_back_to_fp32_once_then_stops_a_diverged_run():
    g = PrecisionGuard("bf16", patience=3)
    assert "float32" in g.failed(7) and g.precision == "fp32" and g.fallback_step == 7
    g.failed(7)
    g.passed()  # a good step resets the count of failures in a row
    g.failed(8)
    g.failed(8)
    with pytest.raises(ValueError, match="diverged: 3 steps in a row"):
        g.failed(8)
    assert g.state() == {"precision": "fp32", "skipped_steps": 5, "precision_fallback_step": 7}


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                       (False, False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_in_it(monkeypatch, avx512_bf16, amx,
                                                                  expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert pick_precision("auto", CPU) == expected
    assert pick_precision("fp32", CPU) == "fp32" and pick_precision("bf16", CPU) == "bf16"


def test_contrastive_weight_is_refused_for_sound_of_pixels(tmp_path, capsys, one_thread):
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "1",
              "--model", "sop", "--contrastive-weight", "0.1"])
    assert e.value.code == 2
    assert "--contrastive-weight" in capsys.readouterr().err
    with pytest.raises(ValueError, match="queries"):
        train_step(small_model("sop"), [], MixSampler(tone_clips(), 64), 2, 128, CPU,
                   contrastive_weight=0.1)


def test_ckpt_spec_splits_at_the_last_equals_sign_and_needs_the_checkpoint(tmp_path):
    from training.evaluate import parse_ckpt

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.json").write_text("{}")
    assert parse_ckpt(f"trained on K=3={tmp_path}/run/best") == ("trained on K=3",
                                                                 [tmp_path / "run" / "best"])
    assert parse_ckpt(f"x={tmp_path}/run/best.json")[1] == [tmp_path / "run" / "best"]
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "best.json").write_text("{}")
    assert parse_ckpt(f"two={tmp_path}/run/best+{tmp_path}/run2/best")[1] == [
        tmp_path / "run" / "best", tmp_path / "run2" / "best"]
    for bad in ("no-equals", f"={tmp_path}/run/best", "x=", f"x={tmp_path}/missing",
                f"x={tmp_path}/run/best+", f"x={tmp_path}/run/best+{tmp_path}/missing"):
        with pytest.raises(ValueError, match="--ckpt"):
            parse_ckpt(bad)


def test_mask_ensemble_is_the_mean_of_its_members_and_needs_one_grid(one_thread):
    from training.evaluate import MaskEnsemble

    torch.manual_seed(0)
    a, b = small_model().eval(), small_model().eval()
    t = to_tensors(MixSampler(tone_clips(), 64, seed=3).sample(2), a.n_rows, CPU)
    args = (t["x"], t["obj"], t["class_ids"], t["motion"], t["motion_pad"],
            t["query_pad"])
    with torch.no_grad():
        torch.testing.assert_close(MaskEnsemble([a, b])(*args), (a(*args) + b(*args)) / 2)
    other = make_model("iquery", "cpu", **(SMALL | {"n_rows": 2 * a.n_rows}))
    with pytest.raises(ValueError, match="rows, frames"):
        MaskEnsemble([a, other])


def test_mix_size_switches_at_the_first_lr_drop_only_when_asked():
    assert [mix_size(p, 3, 2, (0.8,)) for p in (0.0, 0.79, 0.8, 1.0)] == [3, 3, 2, 2]
    assert [mix_size(p, 3, 2, (0.4, 0.8)) for p in (0.39, 0.4, 0.9)] == [3, 2, 2]
    assert [mix_size(p, 3, None, (0.8,)) for p in (0.0, 0.9)] == [3, 3]


def test_lr_schedule_drops_tenfold_at_each_step_of_the_budget():
    steps = (0.4, 0.8)
    assert [lr_factor(p, steps) for p in (0.0, 0.39, 0.4, 0.79, 0.8, 1.0)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(0.79) == 1.0 and lr_factor(0.9) == pytest.approx(0.1)  # the default
    model = small_model("iquery")
    opts = make_optimizers(model, 1e-4, 1e-3)
    base = [[g["lr"] for g in o.param_groups] for o in opts]
    set_lr(opts, base, 0.85, steps)
    assert [g["lr"] for o in opts for g in o.param_groups] == pytest.approx(
        [lr * 0.01 for lrs in base for lr in lrs])
    set_lr(opts, base, 0.1, steps)  # back to the start (a resumed run recomputes from progress)
    assert [g["lr"] for o in opts for g in o.param_groups] == pytest.approx(
        [lr for lrs in base for lr in lrs])


def test_linear_lr_schedule_decays_to_zero_at_the_end_of_the_budget():
    assert [lr_factor(p, (0.8,), "linear") for p in (0.0, 0.25, 0.8, 1.0, 1.1)] == pytest.approx(
        [1.0, 0.75, 0.2, 0.0, 0.0])
    model = small_model("iquery")
    opts = make_optimizers(model, 1e-4, 1e-3)
    base = [[g["lr"] for g in o.param_groups] for o in opts]
    set_lr(opts, base, 0.5, (0.8,), "linear")
    assert [g["lr"] for o in opts for g in o.param_groups] == pytest.approx(
        [lr * 0.5 for lrs in base for lr in lrs])
    with pytest.raises(ValueError, match="LR schedule"):
        lr_factor(0.5, (0.8,), "exponential")


def test_cosine_lr_schedule_follows_half_a_cosine_to_zero():
    got = [lr_factor(p, (0.8,), "cosine") for p in (0.0, 0.25, 0.5, 0.75, 1.0, 1.1)]
    assert got == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0, 0.0], abs=1e-6)
    # It stays above the linear decay for the first half and below it for the second.
    assert lr_factor(0.3, (), "cosine") > lr_factor(0.3, (), "linear")
    assert lr_factor(0.7, (), "cosine") < lr_factor(0.7, (), "linear")


def test_anneal_lr_schedule_holds_then_decays_to_zero_over_the_last_fifth():
    # Full LR until the first --lr-steps fraction, then a straight line to 0 at the budget's end.
    assert [lr_factor(p, (0.8,), "anneal") for p in (0.0, 0.79, 0.8, 0.9, 0.95, 1.0, 1.1)] == \
        pytest.approx([1.0, 1.0, 1.0, 0.5, 0.25, 0.0, 0.0])
    assert lr_factor(0.7, (0.6, 0.8), "anneal") == pytest.approx(0.75)  # from the first fraction
    with pytest.raises(ValueError, match="lr-steps"):
        lr_factor(0.5, (), "anneal")


def test_cli_refuses_anneal_without_a_start(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "1",
              "--lr-schedule", "anneal", "--lr-steps", ""])
    assert e.value.code == 2
    assert "--lr-schedule anneal starts its decay" in capsys.readouterr().err


@pytest.mark.parametrize("flag, bad, says", [
    ("--lr-schedule", "exponential", "--lr-schedule"),
    ("--lr-steps", "0.4,1.2", "--lr-steps"), ("--lr-steps", "half", "--lr-steps"),
    ("--lr-steps", "0", "--lr-steps"),  # fractions of the budget, in (0, 1)
    ("--n-mix", "1", "--n-mix must be >= 2"), ("--n-mix", "0", "--n-mix must be >= 2"),
    ("--loss-weight", "sdr", "--loss-weight"),
    ("--n-mix-final", "1", "--n-mix-final must be >= 2"),
    # The cpu preset's U-Net has 6 levels: both axes must halve six times.
    ("--n-frames", "100", "--n-frames must be a positive multiple of 64"),
    ("--n-frames", "0", "--n-frames must be a positive multiple of 64"),
    ("--n-rows", "96", "--n-rows must be a positive multiple of 64"),
    ("--ema", "1", "--ema must be in [0, 1)"), ("--ema", "-0.5", "--ema must be in [0, 1)"),
    ("--dropout", "1", "--dropout takes a value in [0, 1)"),
    ("--dropout", "-0.1", "--dropout takes a value in [0, 1)"),
    ("--mask-dim", "0", "--mask-dim must be >= 1"),
    # a U-Net level of the cpu preset's 6: 2, 4, 8, 16 or 32
    ("--token-stride", "3", "--token-stride takes one of [2, 4, 8, 16, 32]"),
    ("--token-stride", "64", "--token-stride takes one of [2, 4, 8, 16, 32]"),
    ("--audio-layers", "0", "--audio-layers takes a count >= 1")])
def test_cli_refuses_bad_values_with_a_one_line_error(tmp_path, capsys, flag, bad, says):
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "1",
              flag, bad])
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def _mags(seed=0, b=2, rows=16, frames=12):
    """Warped magnitudes of three sources, one loud, one quieter, one nearly silent."""
    level = torch.tensor([1.0, 0.3, 0.01])[:, None, None]
    g = torch.Generator().manual_seed(seed)
    mag_src = torch.rand(b, 3, rows, frames, generator=g) * level
    return mag_src.sum(1, keepdim=True), mag_src


def test_log1p_loss_weight_is_the_papers():
    mag_mix, mag_src = _mags()
    mag_mix = mag_mix * 50
    assert torch.equal(loss_weight(mag_mix, mag_src), torch.log1p(mag_mix).clamp(1e-3, 10))


def test_mag_loss_weight_makes_the_mask_l1_the_separated_magnitudes_l1():
    mag_mix, mag_src = _mags()
    target = (mag_src / mag_mix).clamp(0, 1)
    masks = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    w = loss_weight(mag_mix, mag_src, "mag")
    # |S_mix| |m - m*| = |m |S_mix| - |S_k||: the L1 of the separated magnitude, per unit of
    # the window's mean mixture magnitude
    want = ((masks * mag_mix - mag_src).abs() / mag_mix.mean((2, 3), keepdim=True)).mean()
    assert mask_loss(masks, target, w) == pytest.approx(float(want), rel=1e-5)
    # and it does not care about the recording's level, unlike log1p
    assert torch.allclose(loss_weight(mag_mix * 7, mag_src * 7, "mag"), w)
    assert not torch.allclose(loss_weight(mag_mix * 7, mag_src * 7), loss_weight(mag_mix, mag_src))


def test_source_loss_weight_counts_a_quiet_source_like_a_loud_one():
    mag_mix, mag_src = _mags()  # sources 1, 0.3 and 0.01 as loud
    target = (mag_src / mag_mix).clamp(0, 1)
    w = loss_weight(mag_mix, mag_src, "source")
    assert w.shape == mag_src.shape
    # the same relative error on each source (its magnitude estimate off by 10 %) costs the same
    masks = target * 1.1
    per_source = (w * (masks - target).abs()).mean((0, 2, 3))
    assert per_source[1] == pytest.approx(float(per_source[0]), rel=1e-4)
    # the quietest source is under a tenth of the mixture's mean: its weight is floored there
    floor = mag_mix / (0.1 * mag_mix.mean((2, 3), keepdim=True))
    assert torch.allclose(w[:, 2:], floor)
    silent = loss_weight(mag_mix, torch.zeros_like(mag_src), "source")
    assert torch.isfinite(silent).all() and silent.max() <= 10 * loss_weight(
        mag_mix, mag_src, "mag").max() + 1e-4


def test_mix_target_is_the_clamped_ratio_to_the_mixture():
    mag_mix, mag_src = _mags()
    mag_mix = mag_mix * 0.8  # sources that partly cancel: |S_mix| < sum_k |S_k|
    want = (mag_src / mag_mix).clamp(0, 1)
    assert torch.equal(ratio_mask(mag_src, mag_mix), want)
    assert (want == 1).any()  # the clamp bites where the loud source alone exceeds the mixture


def test_sources_target_sums_to_one_and_ignores_the_mixture():
    mag_mix, mag_src = _mags()
    m = ratio_mask(mag_src, mag_mix * 0.8, "sources")
    assert torch.allclose(m.sum(1), torch.ones_like(m.sum(1)))
    assert torch.equal(m, ratio_mask(mag_src, mag_mix * 3, "sources"))
    # it is the mix target wherever the sources' magnitudes add up to the mixture's
    assert torch.allclose(m, ratio_mask(mag_src, mag_mix), atol=1e-6)
    silent = ratio_mask(torch.zeros_like(mag_src), mag_mix, "sources")
    assert torch.equal(silent, torch.zeros_like(silent))
    with pytest.raises(ValueError, match="unknown mask target 'irm'"):
        ratio_mask(mag_src, mag_mix, "irm")


def test_unknown_loss_weight_is_refused():
    mag_mix, mag_src = _mags()
    with pytest.raises(ValueError, match="unknown loss weight 'sdr'"):
        loss_weight(mag_mix, mag_src, "sdr")


_ALLOC = """
import resource, sys, torch
sys.path.insert(0, {root!r})
if {retain}:
    from training.train import retain_freed_memory
    assert retain_freed_memory()
with open("/proc/self/maps") as f:
    heap = [[int(a, 16) for a in line.split()[0].split("-")] for line in f if "[heap]" in line]
first = torch.empty(4 << 20)  # 16 MB, an activation of the 256-row step
print(int(any(lo <= first.data_ptr() < hi for lo, hi in heap) or not heap))
del first
for i in range(12):  # allocated and freed, as every training step does
    if i == 4:  # steady state
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(4 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_retain_freed_memory_serves_large_blocks_from_the_heap():
    """glibc's default maps a fresh 16 MB block outside the heap (and unmaps it when freed: the
    next step faults its pages in again); after retain_freed_memory it comes from the heap, and
    a block allocated and freed over and over costs no page faults."""
    root = str(Path(__file__).resolve().parents[2])
    out = {}
    for retain in (False, True):
        res = subprocess.run([sys.executable, "-c", _ALLOC.format(root=root, retain=retain)],
                             capture_output=True, text=True, check=True).stdout.split()
        out[retain] = (res[-2] == "1", int(res[-1]))  # (in the heap, steady-state faults)
    assert not out[False][0], out  # mmapped: the bench_train_step.py slow path
    assert out[True][0], out
    assert out[True][1] < 500, out  # 8 x 4096 pages if each block were faulted in again
