"""Tests of the SynthMUSIC generator: layout, determinism, resuming, bad input, and that what is
drawn and heard agree (boxes on the glyphs, motion with the music, mix = sum of stems)."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from scipy.io import wavfile

from training import synth
from training.instruments import load_vocabulary
from training.synth_music import Renderer, normalise
from training.synth_video import EmojiArt, Figure, Pose, draw_frame, pose_curves

SF2 = synth.DEFAULT_SOUNDFONT
FONT = synth.DEFAULT_FONT
needs_assets = pytest.mark.skipif(
    not (SF2.is_file() and FONT.is_file()),
    reason="needs Debian fluid-soundfont-gm and fonts-noto-color-emoji (scripts/setup.sh)",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, float]:
    """A tiny dataset generated once through the command line, with its wall time."""
    if not (SF2.is_file() and FONT.is_file()):
        pytest.skip("SoundFont / emoji font not installed")
    out = tmp_path_factory.mktemp("synth") / "tiny"
    t0 = time.monotonic()
    assert synth.main(["--out", str(out), "--size", "tiny", "--seed", "0", "--quiet"]) == 0
    return out, time.monotonic() - t0


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return [r for r in csv.reader(f) if r]


def test_vocabulary_order_and_fields():
    vocab = load_vocabulary()
    assert [v.class_id for v in vocab] == list(range(12))
    assert vocab[0].name == "accordion" and vocab[-1].name == "violin"
    drum = next(v for v in vocab if v.name == "drum")
    assert drum.is_drums and drum.pitch is None and 38 in drum.notes
    violin = vocab[-1]
    assert violin.gm_program == 40 and violin.pitch == (55, 91) and not violin.is_drums


def test_vocabulary_rejects_bad_entries(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[kazoo]\ngm_program = 200\nemoji = "x"\npitch = [60, 80]\n')
    with pytest.raises(ValueError, match="gm_program=200"):
        load_vocabulary(bad)
    bad.write_text('[kazoo]\ngm_program = 3\nemoji = "x"\npitch = [60, 65]\n')
    with pytest.raises(ValueError, match="pitch="):
        load_vocabulary(bad)


@needs_assets
def test_tiny_layout_and_time(tiny):
    out, seconds = tiny
    assert seconds < 30.0, f"tiny took {seconds:.1f} s; budget 30 s"
    info = json.loads((out / "dataset.json").read_text())
    assert info["complete"] and info["config"]["classes"] == ["accordion", "acoustic_guitar"]
    for split in ("train", "val", "test"):
        rows = _rows(out / f"{split}.csv")
        assert len(rows) == 4  # 2 classes x 2 clips
        for audio, frames, n in rows:
            cls = Path(audio).parent.name
            clip_id = Path(audio).stem
            sr, pcm = wavfile.read(out / audio)
            assert sr == 11025 and pcm.dtype == np.int16 and pcm.ndim == 1
            jpgs = sorted((out / frames).glob("*.jpg"))
            assert len(jpgs) == int(n) and jpgs[0].name == "000001.jpg"
            assert abs(len(pcm) / sr - int(n) / 8) < 1e-3  # audio and frames span one time
            boxes = np.load(out / "detection_results" / cls / f"{clip_id}.mp4.npy")
            meta = json.loads((out / "meta" / cls / f"{clip_id}.json").read_text())
            main_rows = boxes[boxes[:, 1] == meta["class_id"]]
            assert sorted(main_rows[:, 0]) == list(range(1, int(n) + 1))  # every frame, 1-based
            assert (boxes[:, 3] < boxes[:, 5]).all() and (boxes[:, 4] < boxes[:, 6]).all()
            assert boxes[:, 3:].min() >= 0 and boxes[:, 3:].max() <= 224
            assert meta["notes"] and 70 <= meta["tempo_bpm"] <= 160
            assert (out / "videos" / cls / f"{clip_id}.mkv").is_file()
    pairs = _rows(out / "test_pairs.csv")
    assert pairs and all(Path(p[0]).parent.name != Path(p[3]).parent.name for p in pairs)
    assert len(_rows(out / "ensembles.csv")) == 2


@needs_assets
def test_ensemble_mix_stems_boxes_and_video(tiny):
    out, _ = tiny
    ens = out / "ensembles" / "ens_0000"
    meta = json.loads((ens / "meta.json").read_text())
    _, mix = wavfile.read(ens / "mix.wav")
    stems = [wavfile.read(ens / "stems" / f"{c}.wav")[1].astype(np.int32) for c in meta["classes"]]
    assert np.array_equal(np.sum(stems, axis=0), mix)  # the mix is exactly the stems' sum
    for s in stems:
        assert 20 * np.log10(np.sqrt(np.mean((s / 32768.0) ** 2))) > -45  # every stem sounds
    boxes = np.load(ens / "boxes.npy")
    vocab = {v.name: v.class_id for v in load_vocabulary()}
    assert set(boxes[:, 1].astype(int)) == {vocab[c] for c in meta["classes"]}
    # the video holds the exact mixture samples and every frame
    with av.open(str(ens / "video.mkv")) as c:
        audio = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)[0]
    with av.open(str(ens / "video.mkv")) as c:
        n_video = sum(1 for _ in c.decode(video=0))
    assert np.array_equal(audio[: len(mix)], mix) and n_video == meta["n_frames"]


@needs_assets
def test_same_seed_same_wav_bytes(tiny, tmp_path):
    out, _ = tiny
    info = json.loads((out / "dataset.json").read_text())
    jobs = synth.plan_jobs(info["config"])
    job = next(j for j in jobs if j["kind"] == "solo" and j["split"] == "val")
    for seed, same in ((0, True), (1, False)):
        cfg = dict(info["config"], out=str(tmp_path / f"s{seed}"), seed=seed)
        synth._init_worker(cfg)
        synth.make_solo(job)
        rel = Path("audio") / job["class"] / f"{job['id']}.wav"
        a, b = (out / rel).read_bytes(), (tmp_path / f"s{seed}" / rel).read_bytes()
        assert (a == b) is same


@needs_assets
def test_refuses_complete_and_resumes_interrupted(tiny, tmp_path, capsys):
    out, _ = tiny
    assert synth.main(["--out", str(out), "--size", "tiny", "--seed", "0", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    info = json.loads((copy / "dataset.json").read_text())
    info["complete"] = False
    info["config"]["out"] = str(copy)
    info["config"]["melody_cache"] = str(copy / "melodies_tiny.json")
    (copy / "dataset.json").write_text(json.dumps(info))
    # an interruption: one clip without its completion mark, one half-built ensemble
    (copy / "meta" / "accordion" / "accordion_train_0001.json").unlink()
    wav = copy / "audio" / "accordion" / "accordion_train_0001.wav"
    original = wav.read_bytes()
    wav.write_bytes(b"partial")
    shutil.rmtree(copy / "ensembles" / "ens_0001")
    (copy / "ensembles" / ".ens_0001.tmp").mkdir()
    cfg = info["config"]
    summary = synth.generate(cfg, workers=1, progress=False)
    assert summary["generated_now"] == 2
    assert wav.read_bytes() == original
    assert (copy / "ensembles" / "ens_0001" / "meta.json").is_file()
    assert json.loads((copy / "dataset.json").read_text())["complete"]
    # other settings on an unfinished dataset are refused, not mixed in
    info["complete"] = False
    (copy / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(synth.SynthError, match="seed"):
        synth.generate(dict(cfg, seed=5), workers=1, progress=False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--classes", "violin,kazoo"], "allowed: accordion"),
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--size", "huge"], "invalid choice"),
        (["--workers", "0"], "--workers 0"),
    ],
)
def test_bad_arguments_exit_with_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synth.main(["--out", str(tmp_path / "x"), *argv])
    assert e.value.code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_assets_name_the_debian_package(tmp_path, capsys):
    base = ["--out", str(tmp_path / "x"), "--size", "tiny", "--quiet"]
    assert synth.main([*base, "--soundfont", str(tmp_path / "none.sf2")]) == 2
    assert "fluid-soundfont-gm" in capsys.readouterr().err
    if SF2.is_file():
        assert synth.main([*base, "--font", str(tmp_path / "none.ttf")]) == 2
        assert "fonts-noto-color-emoji" in capsys.readouterr().err


@needs_assets
def test_render_starts_at_the_onset_and_levels():
    violin = load_vocabulary()[-1]
    audio = Renderer().render(violin, [(67, 0.5, 0.4, 100)], 11025)
    assert np.abs(audio[: int(0.49 * 11025)]).max() < 1e-4  # silent before the note
    assert np.sqrt(np.mean(audio[int(0.5 * 11025): int(0.9 * 11025)] ** 2)) > 1e-3
    scaled, _ = normalise(audio, -20.0)
    sounding = scaled[int(0.5 * 11025): int(0.9 * 11025)]
    assert abs(20 * np.log10(np.sqrt(np.mean(sounding ** 2))) - -20.0) < 3.0


def test_silent_figures_barely_move_and_playing_ones_do():
    rng = np.random.default_rng(0)
    n = 40
    silent = np.zeros(n)
    pulse = np.zeros(n)
    pulse[::4] = 1.0
    parity = np.where(np.arange(n) % 8 < 4, 1.0, -1.0)
    for style in ("bow", "strum", "wind", "keys", "bellows", "hit", "shake"):
        still = pose_curves(style, silent, silent, np.ones(n), 8.0, rng, amp=60)
        moving = pose_curves(style, pulse, pulse, parity, 8.0, rng, amp=60)

        def energy(p: Pose) -> float:
            return float(np.abs(np.diff(p.dy)).sum() + np.abs(np.diff(p.dx)).sum()
                         + np.abs(np.diff(p.angle)).sum() + 60 * np.abs(np.diff(p.sx)).sum())

        assert energy(moving) > 3 * energy(still), style


@needs_assets
def test_box_matches_the_drawn_glyph():
    art = EmojiArt()
    bg = np.full((232, 232, 3), 128, np.uint8)
    n = 3
    pose = Pose(np.zeros(n), np.zeros(n), np.array([0.0, 15.0, -20.0]), np.ones(n), np.zeros(n))
    fig = Figure(7, art.scaled("\U0001F3BA", 60), 100.0, 120.0, pose, face=None)
    for k in range(n):
        frame, boxes = draw_frame(bg, 4, (2, -1), [fig], k)
        ys, xs = np.nonzero(np.abs(frame.astype(int) - 128).sum(axis=2) > 0)
        drawn = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert boxes[0][0] == 7
        assert np.abs(np.array(boxes[0][1:]) - np.array(drawn)).max() <= 1, (boxes, drawn)



@needs_assets
def test_music_loader_reads_the_generated_layout(tiny):
    from training.music_data import MusicIndex, list_ensembles, load_audio, load_boxes, load_frames

    out, _ = tiny
    index = MusicIndex.from_csv(out / "test.csv")
    assert index.classes == ["accordion", "acoustic_guitar"]
    clip = index[0]
    _, pcm = wavfile.read(clip.audio_path)
    np.testing.assert_array_equal(load_audio(clip, 0.0, 1.0), pcm[:11025] / 32768.0)
    assert load_frames(clip, [0.0, 1.0], 112).shape == (2, 112, 112, 3)
    assert len(load_boxes(clip)) >= clip.n_frames
    ensembles = list_ensembles(out)
    assert [e.clip_id for e in ensembles] == ["ens_0000", "ens_0001"]
    assert all(e.stem_path(c).is_file() for e in ensembles for c in e.classes)


@needs_assets
def test_detector_cli_trains_exports_and_scores(tiny, tmp_path):
    from training import train_detector
    from training.detector import OnnxDetector

    data, _ = tiny
    out = tmp_path / "det"
    assert train_detector.main(["--data", str(data), "--out", str(out), "--steps", "3",
                                "--batch", "4", "--frames-per-clip", "2", "--in-size", "64",
                                "--threads", "1"]) == 0
    boxes, scores, cls = OnnxDetector(out / "detector.onnx")(
        np.zeros((1, 224, 224, 3), np.uint8))
    assert boxes.shape[:2] == scores.shape == cls.shape
    metrics = json.loads((out / "detector_metrics.json").read_text())
    assert metrics["in_size"] == 64 and metrics["train_frames"] == 2 * 4
    assert metrics["n_test_solo_frames"] == 3 * 4 and metrics["n_ensemble_frames"] == 2 * 2
    for key in ("map50_test_solo", "map50_ensembles", "naming_accuracy_test_solo",
                "ensembles_exact_class_set"):
        assert 0.0 <= metrics[key] <= 1.0, key


@needs_assets
def test_detector_naming_scores_follow_what_is_detected(tiny, tmp_path):
    """A detector that always sees an accordion (0.9) and a guitar (0.8) names both tiny
    ensembles (accordion + guitar) right and half the solo clips (it names each by the
    accordion); one that sees only the accordion names no ensemble right."""
    from nodes.bundle import write_fixed_detector
    from training.train_detector import naming_scores

    data, _ = tiny
    both = write_fixed_detector(tmp_path / "both.onnx", [0, 1],
                                [[0.1, 0.1, 0.4, 0.9], [0.6, 0.1, 0.9, 0.9]], [0.9, 0.8])
    assert naming_scores(both, data) == {"naming_accuracy_test_solo": 0.5,
                                         "ensembles_exact_class_set": 1.0}
    one = write_fixed_detector(tmp_path / "one.onnx", [0], [[0.1, 0.1, 0.4, 0.9]], [0.9])
    assert naming_scores(one, data)["ensembles_exact_class_set"] == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--in-size", "100"], "multiple of 8"),
    (["--data", "/nonexistent"], "no train.csv"),
])
def test_detector_cli_refuses_bad_arguments_in_one_line(argv, message, tmp_path, capsys):
    from training import train_detector

    base = ["--data", str(tmp_path), "--out", str(tmp_path / "det")]
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(SystemExit) as e:
        train_detector.main(base + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


@needs_assets
def test_frame_features_are_whole_frame_features_in_the_crop_layout(tiny, tmp_path):
    """training.frame_features writes, for every solo clip, the frame classifier's feature of
    the clip's whole frames (boxes play no part) beside the crop cache's own motion tokens, in
    the layout train.py and evaluate.py read."""
    from models.checkpoint import load_checkpoint
    from models.features import normalise
    from training import encoders, frame_features
    from training.music_data import MusicIndex

    data, _ = tiny
    crops, frames = tmp_path / "crops", tmp_path / "frames"
    assert encoders.main(["--data", str(data), "--features", str(crops), "--encoders-out",
                          str(tmp_path / "enc"), "--obj-steps", "2", "--motion-steps", "2"]) == 0
    assert frame_features.main(["--data", str(data), "--out", str(frames), "--crop-features",
                                str(crops), "--encoder-out", str(tmp_path / "fenc"),
                                "--steps", "2", "--size", "48"]) == 0
    enc, meta = load_checkpoint(tmp_path / "fenc" / "object_encoder")
    assert meta["frame_size"] == 48 and 0.0 <= meta["val_clip_accuracy"] <= 1.0
    for split in ("train", "val", "test"):
        for clip in MusicIndex.from_csv(data / f"{split}.csv"):
            stem = Path(clip.class_name) / clip.clip_id
            obj = np.load(f"{frames / 'gt' / stem}.obj.npy")
            with torch.no_grad():
                want = enc(normalise(frame_features.frame_stack(clip, 48))[None])[0].numpy()
            np.testing.assert_allclose(obj, want, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(np.load(f"{frames / 'gt' / stem}.motion.npy"),
                                          np.load(f"{crops / 'gt' / stem}.motion.npy"))
    assert not (frames / "det").exists()  # the crop cache has no detector-named stems


def test_frame_features_refuse_a_missing_crop_cache(tmp_path, capsys):
    from training import frame_features

    with pytest.raises(SystemExit) as e:
        frame_features.main(["--data", str(tmp_path), "--out", str(tmp_path / "f")])
    assert e.value.code == 2 and "training.encoders" in capsys.readouterr().err
