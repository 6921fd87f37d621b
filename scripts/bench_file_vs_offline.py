"""File through the engine vs offline evaluation: the same checkpoint, the same ensemble clips,
the same BSS-eval SDR (training.metrics.bss_eval, mir_eval without permutation).

    python scripts/bench_file_vs_offline.py --n 8                      # bundle defaults
    python scripts/bench_file_vs_offline.py --n 8 --lookahead 2 --block 2   # live settings

For each of the first N ensemble clips of --data (SynthMUSIC ``ensembles/*``):
* engine: ``run_engine.py --input <clip>/video.mkv --out ...`` (a file run: the separator waits
  for vision, so the result does not depend on timing); each output ``<class>#k.wav`` is matched
  to the ground-truth stem of its class (several tracks of one class are summed; a class
  without a track scores silence; outputs of classes not in the clip are listed as extra);
* offline: training.evaluate.model_estimates of the bundle's separator checkpoint on the whole
  clip (training.separate: windows of n_frames, 50% overlap, triangular weights), with
  ground-truth-named queries (cached gt features) and with detector-named queries (cached
  detector-track features), as the offline evaluation table does;
* streamed_gt: the engine's own sliding schedule (block, lookahead) run offline with the cached
  gt-named queries: the schedule alone, without the live detector and encoders.
The engine's queries come from its own detector + encoders at run time: it separates an
instrument from the moment its detector first names it, while offline features pool the whole
clip. Columns ``*_span`` score every estimate again from the time all classes of the clip are
being separated by the engine (NaN when that leaves < 2 s): there "engine_span - offline_*_span"
isolates the streaming itself (sliding block schedule, live encoders) from detection delay.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the repository packages


def engine_estimates(clip_dir: Path, classes: list[str], n: int, bundle: str, work: Path,
                     extra_args: list[str]) -> tuple[np.ndarray, list[str], float, float | None]:
    """Run the engine on ``clip_dir/video.mkv``: estimates (K, n) by class, extra labels, wall
    seconds, and the time from which every class of the clip is being separated (None: some
    class never is)."""
    from run_engine import read_wav

    out, run_dir = work / "sep", work / "run"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "run_engine.py"), "--input",
                           str(clip_dir / "video.mkv"), "--out", str(out), "--bundle", bundle,
                           "--run-dir", str(run_dir), *extra_args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    wall = time.monotonic() - t0
    if proc.returncode not in (0, 3):  # 3: no instrument found: every class scores silence
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"run_engine failed on {clip_dir.name} (exit {proc.returncode}): "
                           f"{tail}")
    est = np.zeros((len(classes), n), np.float32)
    extra = []
    for f in sorted(out.glob("*.wav")):
        cls = f.stem.split("#")[0]
        if cls not in classes:
            extra.append(f.stem)
            continue
        x = read_wav(f)[:n]
        est[classes.index(cls), :len(x)] += x
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() \
        else {"instruments": []}
    first = {c: min((span[0] for i in summary["instruments"] if i["class"] == c
                     for span in i["separated_s"]), default=None) for c in classes}
    start = None if None in first.values() else max(first.values())
    return est, extra, wall, start


def streamed_gt_estimates(model: object, item: dict, names: list[str], block: int,
                          lookahead: int, blend: bool = True) -> np.ndarray:
    """The engine's sliding schedule (models.streaming: ``block`` frames per step, ``lookahead``
    frames of right context, window = the model's n_frames) run offline with the cached
    ground-truth-named queries: estimates (K, N). Motion tokens follow each window as in
    training.separate. Against offline_gt this isolates the schedule; against the engine, the
    live queries (detector timing, live crops and tubes)."""
    import torch

    from models.spectral import istft, stft
    from models.streaming import Blend, check_window, step_masks, step_window
    from training.evaluate import query_from
    from training.separate import motion_window

    window, n_rows = model.n_frames, model.n_rows
    check_window(window, block, lookahead)
    queries = [query_from(stem, names, c) for stem, c in zip(item["gt"], item["classes"],
                                                              strict=True)]
    obj = torch.from_numpy(np.stack([q.obj for q in queries])).float()[None]  # (1, Q, obj_dim)
    cls = torch.tensor([[q.class_id for q in queries]])
    qpad = torch.zeros(1, len(queries), dtype=torch.bool)
    mix = torch.from_numpy(item["mix"]).float()
    spec = stft(mix)  # (N_BINS, T)
    n_frames = spec.shape[1]
    left = window - block - lookahead
    padded = torch.nn.functional.pad(spec, (left, block + lookahead))
    blender, out = Blend(window, block, lookahead), []
    with torch.no_grad():
        for e in range(0, n_frames, block):
            # start < 0: zeros there; the clip's last steps read its last window, as the node
            start, offset = step_window(e, window, block, lookahead, n_frames)
            motion, pad = zip(*[motion_window(q.motion, start, window) for q in queries],
                              strict=True)
            mot = torch.from_numpy(np.stack(motion))[None]
            mpad = torch.from_numpy(np.stack(pad))[None]

            def separate(x: torch.Tensor, mot: torch.Tensor = mot,
                         mpad: torch.Tensor = mpad) -> torch.Tensor:
                return model(x, obj, cls, mot, mpad, qpad)

            m = step_masks(separate, padded[:, start + left:start + left + window], n_rows,
                           block, lookahead, ahead=blend, offset=offset)
            if blend:  # as the separator node emits for files
                m = blender([str(k) for k in range(m.shape[0])], m, offset)
            out.append(m[:, :, :min(block, n_frames - e)])
    masks = torch.cat(out, dim=2)  # (Q, N_BINS, T)
    return istft(masks * spec[None], mix.shape[-1]).numpy()


def sweep_items(args: argparse.Namespace, ensembles: list) -> list[dict]:
    """The clips a schedule sweep scores: the first --n test ensemble clips (--sweep-on test),
    or --n of the val pairs that training.evaluate --pairs-from val scores (--sweep-on val,
    evenly spaced), so that a schedule can be chosen without looking at test clips."""
    from training.evaluate import load_items
    from training.music_data import load_audio

    if args.sweep_on == "val":
        pairs, _ = load_items(args.data, 6.0, args.n, 0, pairs_from="val")
        return pairs
    feats = args.data / "features"
    items = []
    for e in ensembles:
        mix = load_audio(e.as_clip())
        refs = np.stack([load_audio(e.stem_path(c)) for c in e.classes])
        n = min(len(mix), refs.shape[1])
        items.append({"name": e.clip_id, "refs": refs[:, :n], "mix": mix[:n],
                      "classes": list(e.classes),
                      "gt": [feats / "gt" / "ensembles" / e.clip_id / c for c in e.classes]})
    return items


def schedule_sweep(args: argparse.Namespace, model: object, names: list[str],
                   ensembles: list, load_before: tuple) -> int:
    """streamed_gt SDR per block:lookahead of --schedules, without and with the Blend of the
    engine's file runs, beside offline_gt; table + JSON."""
    from training.evaluate import model_estimates
    from training.metrics import bss_eval

    schedules = [tuple(int(v) for v in x.split(":")) for x in args.schedules.split(",")]
    rows = []
    items = sweep_items(args, ensembles)
    for item in items:
        sdr = {"offline_gt": bss_eval(item["refs"], model_estimates(model, item, "gt",
                                                                    names))["sdr"]}
        for b, la in schedules:
            for blend in (False, True):  # live runs do not blend, files do
                est = streamed_gt_estimates(model, item, names, b, la, blend)
                key = f"streamed_gt_b{b}_l{la}" + "_blend" * blend
                sdr[key] = bss_eval(item["refs"], est)["sdr"]
        for k, c in enumerate(item["classes"]):
            rows.append({"clip": item["name"], "class": c, **{key: float(v[k])
                                                             for key, v in sdr.items()}})
        print(item["name"], {k: np.round(v, 2).tolist() for k, v in sdr.items()}, file=sys.stderr,
              flush=True)
    cols = [k for k in rows[0] if k not in ("clip", "class")]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in cols}
    print("| schedule (block:lookahead) | mean SDR | vs offline_gt |\n|---|---:|---:|")
    for k in cols:
        print(f"| {k} | {mean[k]:.2f} | {mean[k] - mean['offline_gt']:+.2f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python scripts/bench_file_vs_offline.py " + " ".join(sys.argv[1:]),
            "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
            "bundle": args.bundle, "sweep_on": args.sweep_on, "n_clips": len(items),
            "n_sources": len(rows),
            "mean_sdr": mean, "rows": rows}, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print a table and a JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synth")
    ap.add_argument("--n", type=int, default=8, help="first N ensemble clips (default 8)")
    ap.add_argument("--bundle", default=str(ROOT / "models" / "checkpoints" / "cpu"))
    ap.add_argument("--block", type=int, default=None, help="engine: separator block (frames)")
    ap.add_argument("--lookahead", type=int, default=None, help="engine: lookahead (frames)")
    ap.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the offline part")
    ap.add_argument("--no-offline", action="store_true",
                    help="engine only (e.g. a lookahead sweep; the offline rows are the same)")
    ap.add_argument("--schedules", default=None, metavar="B:L,...",
                    help="no engine: only the streamed_gt SDR of each block:lookahead (e.g. "
                         "4:8,2:4,2:2,2:0), the cost of a shorter lookahead without detector "
                         "noise")
    ap.add_argument("--sweep-on", choices=["test", "val"], default="test",
                    help="clips of --schedules: the first --n test ensemble clips (default), "
                         "or --n val pairs (two val solo clips each, as training.evaluate "
                         "--pairs-from val), to choose a schedule without test clips")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    if args.sweep_on != "test" and not args.schedules:
        raise SystemExit("error: --sweep-on val needs --schedules: the engine itself runs on "
                         "ensemble videos, which only the test split has")

    import torch

    from models.checkpoint import load_checkpoint
    from training.evaluate import model_estimates
    from training.instruments import load_vocabulary
    from training.metrics import bss_eval
    from training.music_data import list_ensembles, load_audio

    torch.set_num_threads(args.threads)
    bundle = Path(args.bundle)
    info_path = bundle / "bundle.json"
    if not info_path.is_file():
        raise SystemExit(f"error: bundle {bundle} has no bundle.json (docs/BUNDLE.md); a "
                         "random one: python -m nodes.bundle --random DIR")
    info = json.loads(info_path.read_text())
    random_bundle = bool(info.get("training", {}).get("random"))
    model, _ = load_checkpoint(bundle / info["separator"])
    model.eval()
    names = [inst.name for inst in load_vocabulary()]
    feats = args.data / "features"
    ensembles = list_ensembles(args.data)[:args.n]
    if not ensembles:
        raise SystemExit(f"error: no ensemble clip under {args.data / 'ensembles'}")
    block = args.block or info["stream"]["block"]
    lookahead = info["stream"]["lookahead"] if args.lookahead is None else args.lookahead
    extra_args = ["--backend", args.backend,
                  *(["--block", str(args.block)] if args.block else []),
                  *(["--lookahead", str(args.lookahead)] if args.lookahead is not None else [])]
    rows, clips = [], []
    work_root = Path(tempfile.mkdtemp(prefix="iq-fvo-"))
    load_before = os.getloadavg()
    if args.schedules:
        return schedule_sweep(args, model, names, ensembles, load_before)
    for e in ensembles:
        mix = load_audio(e.as_clip())
        refs = np.stack([load_audio(e.stem_path(c)) for c in e.classes])
        n = min(len(mix), refs.shape[1])
        refs, mix = refs[:, :n], mix[:n]
        est, extra, wall, start = engine_estimates(e.root, list(e.classes), n, str(bundle),
                                                   work_root / e.clip_id, extra_args)
        sdr = {"engine": bss_eval(refs, est)["sdr"]}
        estimates = {"engine": est}
        if not args.no_offline:
            det_dir = feats / "det" / "ensembles" / e.clip_id
            item = {"name": e.clip_id, "refs": refs, "mix": mix, "classes": list(e.classes),
                    "gt": [feats / "gt" / "ensembles" / e.clip_id / c for c in e.classes],
                    "det": [[det_dir / c] if (det_dir / f"{c}.obj.npy").is_file() else []
                            for c in e.classes]}
            for naming in ("gt", "det"):
                estimates[f"offline_{naming}"] = model_estimates(model, item, naming, names)
                sdr[f"offline_{naming}"] = bss_eval(refs, estimates[f"offline_{naming}"])["sdr"]
            estimates["streamed_gt"] = streamed_gt_estimates(model, item, names, block,
                                                             lookahead)
            sdr["streamed_gt"] = bss_eval(refs, estimates["streamed_gt"])["sdr"]
        # The same scores from the moment the engine separates every class of the clip: the
        # live detector names an instrument only once it has seen it (offline features pool
        # the whole clip), so this part compares the streaming alone.
        a = round((start or 0.0) * 11025)
        for key, x in list(estimates.items()):
            if start is not None and n - a >= 2 * 11025:
                sdr[f"{key}_span"] = bss_eval(refs[:, a:], x[:, a:])["sdr"]
            else:
                sdr[f"{key}_span"] = np.full(len(e.classes), np.nan)
        clips.append({"clip": e.clip_id, "seconds": n / 11025, "engine_wall_s": round(wall, 1),
                      "extra_outputs": extra, "all_classes_separated_from_s": start})
        for k, c in enumerate(e.classes):
            rows.append({"clip": e.clip_id, "class": c,
                         **{key: float(v[k]) for key, v in sdr.items()}})
        print(f"{e.clip_id}: " + ", ".join(f"{r['class']} " + " / ".join(
            f"{r[key]:.2f}" for key in sdr) for r in rows[-len(e.classes):])
              + f" ({' / '.join(sdr)}; engine {wall:.0f} s)", file=sys.stderr, flush=True)

    cols = [k for k in rows[0] if k not in ("clip", "class")]
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in cols}
    diffs = {}
    for k in cols:
        base = "engine_span" if k.endswith("_span") else "engine"
        if k != base:
            diffs[f"{base} - {k}"] = float(np.nanmean([r[base] - r[k] for r in rows]))
    print(f"| clip | class | {' | '.join(cols)} |")
    print("|---|---|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['clip']} | {r['class']} | " + " | ".join(f"{r[k]:.2f}" for k in cols) + " |")
    print("| **mean** | | " + " | ".join(f"**{mean[k]:.2f}**" for k in cols) + " |")
    for k, v in diffs.items():
        print(f"mean SDR difference {k}: {v:+.2f} dB")
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python scripts/bench_file_vs_offline.py " + " ".join(argv or sys.argv[1:]),
        "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
        "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "bundle": str(bundle), "random_bundle": random_bundle,
        "block": block, "lookahead": lookahead,
        "n_clips": len(ensembles), "n_sources": len(rows), "mean_sdr": mean,
        "mean_difference": diffs, "rows": rows, "clips": clips,
        "offline": "training.evaluate.model_estimates (training.separate, 50% overlap windows)",
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
