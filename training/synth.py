"""SynthMUSIC: generate the project's offline audio-visual benchmark in the MUSIC layout.

    python -m training.synth --out data/synth --size default --seed 0

Solo clips (one player; a quarter of them also show a second, silent instrument) go to the
original MUSIC layout (audio/, frames/, detection_results/, index CSVs) plus a playable video and
a meta JSON per clip; ensemble clips (2-3 players, the mix, every stem, ground-truth boxes) go to
ensembles/<id>/. A seed gives byte-identical audio. An interrupted run resumes (see docs/DATA.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import wavfile

from training.instruments import Instrument, load_vocabulary
from training.synth_music import (
    DEFAULT_SOUNDFONT,
    SAMPLE_RATE,
    SPLITS,
    Renderer,
    arrange,
    load_melodies,
    melodies_by_split,
    normalise,
)
from training.synth_video import (
    DEFAULT_FONT,
    MOTION_STYLE,
    EmojiArt,
    activity,
    background,
    camera_shake,
    draw_frame,
    make_figure,
)

FORMAT_VERSION = 1
SEED_MAX = 2**31 - 1
# Generated paths below the output folder; --overwrite deletes exactly these and nothing else.
GENERATED = ["audio", "frames", "detection_results", "videos", "meta", "ensembles",
             "train.csv", "val.csv", "test.csv", "test_pairs.csv", "ensembles.csv",
             "dataset.json"]


@dataclass(frozen=True)
class SizePreset:
    """How much to generate: solo clips per class and split, ensembles, clip lengths in frames."""

    per_split: tuple[int, int, int]  # solo clips per class for train, val, test
    n_ensembles: int
    solo_frames: tuple[int, int]  # inclusive range of frames per solo clip (at --fps)
    ensemble_frames: tuple[int, int]
    melody_set: str
    n_classes: int | None = None  # only the first N selected classes (None: all)


SIZES = {
    "tiny": SizePreset((2, 2, 2), 2, (24, 24), (24, 24), "tiny", n_classes=2),
    "small": SizePreset((6, 2, 2), 16, (80, 96), (64, 96), "default"),
    "default": SizePreset((40, 5, 5), 120, (80, 96), (64, 96), "default"),
}
SILENT_EXTRA_PROB = 0.25
PAIRS_PER_TEST_CLIP = 2


class SynthError(Exception):
    """A bad setting or environment; the command line prints it as one line."""


# ----------------------------------------------------------------------------------------------
# Small writers: every file lands via a temporary name and os.replace, so none is half-written.


def _replace_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_wav(path: Path, pcm: np.ndarray, sample_rate: int) -> None:
    _replace_write(path, lambda p: wavfile.write(p, sample_rate, pcm))


def _write_json(path: Path, obj) -> None:
    _replace_write(path, lambda p: p.write_text(json.dumps(obj, indent=1)))


def _write_npy(path: Path, arr: np.ndarray) -> None:
    def write(p: Path) -> None:
        with p.open("wb") as f:
            np.save(f, arr)

    _replace_write(path, write)


def _to_pcm(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1.0, 32767 / 32768) * 32768).astype(np.int16)


def _write_frames(folder: Path, frames: list[np.ndarray]) -> None:
    """Frames as 000001.jpg ... into `folder`, built beside it and renamed in one step."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp / f"{k + 1:06d}.jpg", quality=90)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def write_video(path: Path, frames: list[np.ndarray], pcm: np.ndarray, fps: int,
                sample_rate: int) -> None:
    """A playable Matroska file: H.264 frames and the exact PCM s16le samples."""
    import av

    def write(p: Path) -> None:
        with av.open(str(p), "w", format="matroska") as out:
            vs = out.add_stream("libx264", rate=fps)
            vs.height, vs.width = frames[0].shape[:2]
            vs.pix_fmt = "yuv420p"
            vs.thread_count = 1  # the generator already runs one process per core
            vs.options = {"preset": "veryfast", "crf": "23"}
            aus = out.add_stream("pcm_s16le", rate=sample_rate, layout="mono")
            for frame in frames:
                out.mux(vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(vs.encode())
            block = 4096
            for i in range(0, len(pcm), block):
                af = av.AudioFrame.from_ndarray(pcm[None, i:i + block], format="s16",
                                                layout="mono")
                af.sample_rate, af.pts = sample_rate, i
                out.mux(aus.encode(af))
            out.mux(aus.encode())

    _replace_write(path, write)


# ----------------------------------------------------------------------------------------------
# Worker side: one SoundFont, one font and the melody pools per process.

_STATE: dict = {}


def _init_worker(cfg: dict) -> None:
    _STATE["cfg"] = cfg
    _STATE["vocab"] = load_vocabulary(cfg["vocabulary"])
    _STATE["renderer"] = Renderer(cfg["soundfont"])
    _STATE["art"] = EmojiArt(cfg["font"])
    melodies = load_melodies(cfg["melody_set"], Path(cfg["melody_cache"]))
    _STATE["pools"] = melodies_by_split(melodies)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    # a clip's randomness depends on its identity alone, never on which worker runs it when
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _clip_audio(inst: Instrument, pool, n_frames: int, rng: np.random.Generator,
                tempo: float | None = None):
    """Arrange + render + level one part; returns (float audio, part, target level dBFS)."""
    cfg = _STATE["cfg"]
    n_samples = round(n_frames / cfg["fps"] * SAMPLE_RATE)
    part = arrange(inst, pool, n_samples / SAMPLE_RATE, rng, tempo_bpm=tempo)
    audio = _STATE["renderer"].render(inst, part.events, n_samples)
    level = float(rng.uniform(-26.0, -20.0))
    audio, _ = normalise(audio, level)
    return audio, part, level


def _part_meta(inst: Instrument, part, level: float) -> dict:
    return {
        "class": inst.name,
        "class_id": inst.class_id,
        "melody_sources": part.sources,
        "tempo_bpm": round(part.tempo_bpm, 2),
        "transpose": part.transpose,
        "level_dbfs": round(level, 2),
        # (MIDI key, onset s, duration s, velocity): what was played, for onset checks
        "notes": [[k, round(o, 4), round(d, 4), v] for k, o, d, v in part.events],
    }


def _scene(rng: np.random.Generator, n_frames: int):
    cfg = _STATE["cfg"]
    size, margin = cfg["frame_size"], max(2, cfg["frame_size"] // 45)
    bg = background(rng, size + 2 * margin, size + 2 * margin)
    shake = camera_shake(rng, n_frames, margin)
    brightness = float(rng.uniform(0.85, 1.1))
    return bg, margin, shake, brightness


def _render_frames(rng, n_frames, figures) -> tuple[list[np.ndarray], np.ndarray]:
    bg, margin, shake, brightness = _scene(rng, n_frames)
    frames, rows = [], []
    for k in range(n_frames):
        frame, boxes = draw_frame(bg, margin, tuple(shake[k]), figures, k, brightness)
        frames.append(frame)
        rows += [[k + 1, b[0], 1.0, *b[1:]] for b in boxes]
    # rows: [frame_idx (1-based), class_id, score, x1, y1, x2, y2] in frame pixels
    return frames, np.asarray(rows, np.float32).reshape(-1, 7)


def make_solo(job: dict) -> dict:
    """Generate one solo clip into the MUSIC layout; the meta JSON is written last."""
    cfg, vocab = _STATE["cfg"], _STATE["vocab"]
    out, fps, size = Path(cfg["out"]), cfg["fps"], cfg["frame_size"]
    inst = vocab[job["class_id"]]
    rng = _rng(cfg["seed"], 1, inst.class_id, SPLITS.index(job["split"]), job["index"])
    n_frames = int(rng.integers(job["frames"][0], job["frames"][1] + 1))
    audio, part, level = _clip_audio(inst, _STATE["pools"][job["split"]], n_frames, rng)
    pcm = _to_pcm(audio)
    env, pulse, parity = activity(part.events, audio, SAMPLE_RATE, fps, n_frames)

    others = [c for c in cfg["class_ids"] if c != inst.class_id]
    extra = None
    if others and rng.random() < SILENT_EXTRA_PROB:
        extra = vocab[others[rng.integers(len(others))]]
    fig_size = int(rng.uniform(0.28, 0.4) * size)
    if extra is None:
        cx = rng.uniform(0.3, 0.7) * size
    else:
        cx = (rng.uniform(0.22, 0.34) if rng.random() < 0.5 else rng.uniform(0.66, 0.78)) * size
    cy = rng.uniform(max(1.45 * fig_size, 0.45 * size), size - 0.55 * fig_size)
    figures = [make_figure(_STATE["art"], inst.class_id, inst.emoji,
                           MOTION_STYLE.get(inst.name, "bob"), cx, cy, fig_size, env, pulse,
                           parity, fps, rng)]
    extra_meta = None
    if extra is not None:
        silent = np.zeros(n_frames)
        held = bool(rng.random() < 0.5)  # held by an idle player, or standing alone
        e_size = int(fig_size * rng.uniform(0.6, 0.9))
        ex = size - cx + rng.uniform(-0.05, 0.05) * size
        ey = (rng.uniform(max(1.45 * e_size, 0.45 * size), size - 0.55 * e_size) if held
              else size - 0.6 * e_size)
        figures.append(make_figure(_STATE["art"], extra.class_id, extra.emoji,
                                   MOTION_STYLE.get(extra.name, "bob"), ex, ey, e_size, silent,
                                   silent, np.ones(n_frames), fps, rng, with_player=held))
        extra_meta = {"class": extra.name, "class_id": extra.class_id, "held": held}
    frames, boxes = _render_frames(rng, n_frames, figures)

    cls, cid = inst.name, job["id"]
    _write_wav(out / "audio" / cls / f"{cid}.wav", pcm, SAMPLE_RATE)
    _write_frames(out / "frames" / cls / f"{cid}.mp4", frames)
    _write_npy(out / "detection_results" / cls / f"{cid}.mp4.npy", boxes)
    write_video(out / "videos" / cls / f"{cid}.mkv", frames, pcm, fps, SAMPLE_RATE)
    meta = {
        "id": cid, "kind": "solo", "split": job["split"], "seed": cfg["seed"],
        "clip_key": [1, inst.class_id, SPLITS.index(job["split"]), job["index"]],
        "sample_rate": SAMPLE_RATE, "n_samples": len(pcm), "fps": fps, "n_frames": n_frames,
        "frame_size": size, "duration_s": round(len(pcm) / SAMPLE_RATE, 4),
        **_part_meta(inst, part, level), "silent_extra": extra_meta,
    }
    _write_json(out / "meta" / cls / f"{cid}.json", meta)  # last: marks the clip complete
    return {"kind": "solo", "class": cls, "split": job["split"], "duration_s": meta["duration_s"]}


def make_ensemble(job: dict) -> dict:
    """Generate one ensemble clip into ensembles/<id>/ (built in a temp folder, then renamed)."""
    cfg, vocab = _STATE["cfg"], _STATE["vocab"]
    out, fps, size = Path(cfg["out"]), cfg["fps"], cfg["frame_size"]
    rng = _rng(cfg["seed"], 2, job["index"])
    ids = list(cfg["class_ids"])
    n_players = 2 if len(ids) < 3 or rng.random() < 0.6 else 3
    chosen = [vocab[c] for c in rng.choice(ids, n_players, replace=False)]
    n_frames = int(rng.integers(job["frames"][0], job["frames"][1] + 1))
    tempo = float(rng.uniform(70.0, 160.0))  # one band, one tempo
    parts = [_clip_audio(inst, _STATE["pools"]["test"], n_frames, rng, tempo) for inst in chosen]
    stems = np.stack([a for a, _, _ in parts])  # (n_players, samples)
    peak = float(np.abs(stems.sum(axis=0)).max())
    if peak > 0.95:  # keep the mix unclipped: scale every stem alike
        stems *= 0.95 / peak
    pcm_stems = np.stack([_to_pcm(s) for s in stems])
    # the mix is the exact integer sum of the stored stems
    pcm_mix = np.clip(pcm_stems.astype(np.int32).sum(axis=0), -32768, 32767).astype(np.int16)

    slot = size / n_players
    fig_size = int(min(0.36 * size, 0.75 * slot) * rng.uniform(0.85, 1.0))
    figures = []
    for i, (inst, (audio, part, _)) in enumerate(zip(chosen, parts, strict=True)):
        env, pulse, parity = activity(part.events, audio, SAMPLE_RATE, fps, n_frames)
        cx = (i + 0.5) * slot + rng.uniform(-0.08, 0.08) * slot
        cy = rng.uniform(max(1.45 * fig_size, 0.5 * size), size - 0.55 * fig_size)
        figures.append(make_figure(_STATE["art"], inst.class_id, inst.emoji,
                                   MOTION_STYLE.get(inst.name, "bob"), cx, cy, fig_size, env,
                                   pulse, parity, fps, rng))
    frames, boxes = _render_frames(rng, n_frames, figures)

    final = out / "ensembles" / job["id"]
    tmp = out / "ensembles" / f".{job['id']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "stems").mkdir(parents=True)
    wavfile.write(tmp / "mix.wav", SAMPLE_RATE, pcm_mix)
    for inst, pcm in zip(chosen, pcm_stems, strict=True):
        wavfile.write(tmp / "stems" / f"{inst.name}.wav", SAMPLE_RATE, pcm)
    np.save(tmp / "boxes.npy", boxes)
    _write_frames(tmp / "frames", frames)
    write_video(tmp / "video.mkv", frames, pcm_mix, fps, SAMPLE_RATE)
    meta = {
        "id": job["id"], "kind": "ensemble", "seed": cfg["seed"], "clip_key": [2, job["index"]],
        "sample_rate": SAMPLE_RATE, "n_samples": len(pcm_mix), "fps": fps,
        "n_frames": n_frames, "frame_size": size,
        "duration_s": round(len(pcm_mix) / SAMPLE_RATE, 4),
        "classes": [inst.name for inst in chosen],
        "left_to_right": [inst.name for inst in chosen],
        "parts": [_part_meta(inst, part, level) for inst, (_, part, level)
                  in zip(chosen, parts, strict=True)],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {"kind": "ensemble", "classes": meta["classes"], "duration_s": meta["duration_s"]}


def _run_job(job: dict) -> dict:
    return make_solo(job) if job["kind"] == "solo" else make_ensemble(job)


# ----------------------------------------------------------------------------------------------
# Driver side: plan, skip what is complete, run, then write the indices and the summary.


def plan_jobs(cfg: dict) -> list[dict]:
    """Every clip of the dataset, in a fixed order: solo clips by class and split, ensembles."""
    preset = SIZES[cfg["size"]]
    vocab = load_vocabulary(cfg["vocabulary"])
    jobs = []
    for cid in cfg["class_ids"]:
        for split, count in zip(SPLITS, preset.per_split, strict=True):
            for i in range(count):
                jobs.append({"kind": "solo", "class_id": cid, "split": split, "index": i,
                             "id": f"{vocab[cid].name}_{split}_{i:04d}",
                             "class": vocab[cid].name, "frames": preset.solo_frames})
    if len(cfg["class_ids"]) >= 2:
        for i in range(preset.n_ensembles):
            jobs.append({"kind": "ensemble", "index": i, "id": f"ens_{i:04d}",
                         "frames": preset.ensemble_frames})
    return jobs


def job_done(out: Path, job: dict) -> bool:
    if job["kind"] == "solo":
        return (out / "meta" / job["class"] / f"{job['id']}.json").is_file()
    return (out / "ensembles" / job["id"] / "meta.json").is_file()


def _index_row(job: dict, n_frames: int) -> list:
    return [f"audio/{job['class']}/{job['id']}.wav", f"frames/{job['class']}/{job['id']}.mp4",
            n_frames]


def write_indices(out: Path, cfg: dict, jobs: list[dict]) -> dict:
    """train/val/test.csv (Sound-of-Pixels rows: audio, frames dir, n_frames; paths relative to
    the dataset root), test_pairs.csv, ensembles.csv; returns the summary."""
    rows: dict[str, list] = {s: [] for s in SPLITS}
    per_class: dict[str, dict[str, int]] = {}
    solo_s = ens_s = 0.0
    for job in jobs:
        if job["kind"] != "solo":
            continue
        meta = json.loads((out / "meta" / job["class"] / f"{job['id']}.json").read_text())
        rows[job["split"]].append(_index_row(job, meta["n_frames"]))
        per_class.setdefault(job["class"], dict.fromkeys(SPLITS, 0))[job["split"]] += 1
        solo_s += meta["duration_s"]
    for split in SPLITS:
        with (out / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(rows[split])
    # fixed test pairs of different classes, drawn from the seed alone
    rng = _rng(cfg["seed"], 3)
    test = rows["test"]
    pairs = []
    for a in test:
        others = [b for b in test if b[0].split("/")[1] != a[0].split("/")[1]]
        n_pick = min(PAIRS_PER_TEST_CLIP, len(others))
        for j in rng.choice(len(others), n_pick, replace=False) if others else []:
            pairs.append(a + others[j])
    with (out / "test_pairs.csv").open("w", newline="") as f:
        csv.writer(f).writerows(pairs)
    ens_rows = []
    for job in jobs:
        if job["kind"] == "ensemble":
            meta = json.loads((out / "ensembles" / job["id"] / "meta.json").read_text())
            ens_rows.append([job["id"], ";".join(meta["classes"]), meta["n_frames"],
                             meta["duration_s"]])
            ens_s += meta["duration_s"]
    with (out / "ensembles.csv").open("w", newline="") as f:
        csv.writer(f).writerows(ens_rows)
    return {"solo_clips_per_class": per_class, "solo_hours": round(solo_s / 3600, 3),
            "ensembles": len(ens_rows), "ensemble_hours": round(ens_s / 3600, 3),
            "test_pairs": len(pairs)}


def _disk_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def prepare_output(out: Path, cfg: dict, overwrite: bool) -> None:
    """Refuse to touch a finished or foreign dataset unless asked; resume a matching one."""
    info_path = out / "dataset.json"
    if overwrite:
        for name in GENERATED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    elif info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("complete"):
            raise SynthError(f"{out} already holds a complete dataset; pass --overwrite to "
                             "regenerate it")
        if info.get("config") != cfg:
            diff = sorted(k for k in cfg if info.get("config", {}).get(k) != cfg[k])
            raise SynthError(f"{out} holds an unfinished dataset made with other settings "
                             f"({', '.join(diff)}); pass --overwrite to start again")
    elif out.is_dir() and any((out / name).exists() for name in GENERATED):
        raise SynthError(f"{out} holds generated files but no dataset.json; pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if not info_path.is_file():
        _write_json(info_path, {"format_version": FORMAT_VERSION, "complete": False,
                                "config": cfg})


def generate(cfg: dict, workers: int = 2, overwrite: bool = False, progress: bool = True) -> dict:
    """Generate (or finish) the dataset described by `cfg`; returns the summary."""
    from tqdm import tqdm

    out = Path(cfg["out"])
    # fail early, in this process, on a missing SoundFont or font (the errors name the package)
    if not Path(cfg["soundfont"]).is_file() or Path(cfg["soundfont"]).suffix.lower() not in (
        ".sf2", ".sf3"
    ):
        Renderer(cfg["soundfont"])  # raises; loading a valid one here would cost seconds
    EmojiArt(cfg["font"])
    prepare_output(out, cfg, overwrite)
    t0 = time.monotonic()
    load_melodies(cfg["melody_set"], Path(cfg["melody_cache"]))  # parse once, before workers
    jobs = plan_jobs(cfg)
    todo = [j for j in jobs if not job_done(out, j)]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="clip", disable=not progress,
               desc="SynthMUSIC")
    if workers <= 1 or len(todo) <= 1:
        _init_worker(cfg)
        for job in todo:
            _run_job(job)
            bar.update()
    elif todo:
        # spawn: workers start clean (no inherited threads or file handles of the caller)
        with mp.get_context("spawn").Pool(workers, _init_worker, (cfg,)) as pool:
            for _ in pool.imap_unordered(_run_job, todo):
                bar.update()
    bar.close()
    summary = write_indices(out, cfg, jobs)
    summary.update({"generated_now": len(todo), "seconds": round(time.monotonic() - t0, 1),
                    "bytes_on_disk": _disk_bytes(out)})
    _write_json(out / "dataset.json", {"format_version": FORMAT_VERSION, "complete": True,
                                       "config": cfg, "summary": summary})
    return summary


def _print_summary(summary: dict) -> None:
    print("SynthMUSIC summary")
    for cls, counts in sorted(summary["solo_clips_per_class"].items()):
        print(f"  {cls:16s} " + "  ".join(f"{s} {n:3d}" for s, n in counts.items()))
    print(f"  solo audio {summary['solo_hours'] * 60:.1f} min, {summary['ensembles']} ensembles "
          f"({summary['ensemble_hours'] * 60:.1f} min), {summary['test_pairs']} test pairs")
    print(f"  {summary['generated_now']} clips generated in {summary['seconds']} s, "
          f"{summary['bytes_on_disk'] / 2**20:.1f} MiB on disk")


def build_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Validate the command line into the config stored in dataset.json."""
    if not 0 <= args.seed <= SEED_MAX:
        parser.error(f"--seed {args.seed} is out of range; allowed: 0..{SEED_MAX}")
    if not 1 <= args.workers <= 64:
        parser.error(f"--workers {args.workers} is out of range; allowed: 1..64")
    if not 1 <= args.fps <= 60:
        parser.error(f"--fps {args.fps} is out of range; allowed: 1..60")
    if not 64 <= args.frame_size <= 1024:
        parser.error(f"--frame-size {args.frame_size} is out of range; allowed: 64..1024")
    try:
        vocab = load_vocabulary(args.vocabulary)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    names = [v.name for v in vocab]
    if args.classes:
        wanted = [c.strip() for c in args.classes.split(",") if c.strip()]
        bad = [c for c in wanted if c not in names]
        if bad or not wanted or len(set(wanted)) != len(wanted):
            parser.error(f"--classes {args.classes!r}: unknown or repeated {bad or wanted}; "
                         f"allowed: {', '.join(names)}")
    else:
        wanted = names
    preset = SIZES[args.size]
    if preset.n_classes is not None:
        wanted = wanted[: preset.n_classes]
    out = Path(args.out).resolve()
    return {
        "out": str(out),
        "size": args.size,
        "seed": args.seed,
        "class_ids": sorted(names.index(c) for c in wanted),
        "classes": [n for n in names if n in wanted],
        "fps": args.fps,
        "frame_size": args.frame_size,
        "sample_rate": SAMPLE_RATE,
        "soundfont": str(Path(args.soundfont).resolve()),
        "font": str(Path(args.font).resolve()),
        "vocabulary": str(Path(args.vocabulary).resolve()) if args.vocabulary else None,
        "melody_set": preset.melody_set,
        "melody_cache": str(Path(args.melody_cache).resolve() if args.melody_cache
                            else out / f"melodies_{preset.melody_set}.json"),
        "format_version": FORMAT_VERSION,
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.synth", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/synth", help="dataset folder (default data/synth)")
    p.add_argument("--size", choices=sorted(SIZES), default="default",
                   help="tiny (2 classes, for tests), small (10 solo clips per class, 16 "
                        "ensembles), default (50 per class, 120 ensembles; ~2.5 min on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help=f"0..{SEED_MAX}")
    p.add_argument("--classes", default="", help="comma-separated class names (default: all)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--fps", type=int, default=8, help="video frame rate (default 8)")
    p.add_argument("--frame-size", type=int, default=224, help="square frame side in pixels")
    p.add_argument("--soundfont", default=str(DEFAULT_SOUNDFONT), help=".sf2 / .sf3 file")
    p.add_argument("--font", default=str(DEFAULT_FONT), help="Noto Color Emoji .ttf")
    p.add_argument("--vocabulary", default=None, help="instruments.toml (default: shipped)")
    p.add_argument("--melody-cache", default=None,
                   help="JSON cache of corpus melodies (default: beside the data, in --out)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous dataset in --out first (otherwise an unfinished one "
                        "made with the same settings is resumed, a finished one is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    cfg = build_config(args, parser)
    try:
        # workers are not part of the dataset's identity: resuming with other workers is fine
        summary = generate(cfg, workers=args.workers, overwrite=args.overwrite,
                           progress=not args.quiet)
    except (SynthError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
