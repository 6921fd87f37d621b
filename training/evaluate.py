"""Evaluate separators on SynthMUSIC: BSS-eval SDR/SIR/SAR (mir_eval) on the fixed test pairs
(K=2) and on the ensemble clips, for the mixture itself, the ideal ratio mask, an NMF baseline
and every trained checkpoint with ground-truth-named and detector-named queries.

    python -m training.evaluate --data data/synth --ckpt sop=runs/sop/best \
        --ckpt iquery=runs/iquery/best --out results/

Each row is cached as <out>/rows/<row>.json (delete it to recompute), with every source's own
scores ("per_source"); <out>/results.json and <out>/results.md gather every row's means. Long
clips are separated by training.separate (windows of n_frames, 50% overlap). `--pairs-from
train` scores pairs of training clips instead of the test pairs (ground-truth-named only):
with the test rows beside it, the generalisation gap. `--pairs-from val` scores pairs of the
val clips, where runs are chosen; `--partners 4 --seconds 12` gives each val clip four
partners over whole clips (240 mixtures of the 60 val clips instead of 60 first 6 s), for a
choice between runs finer than their seed-to-seed differences (docs/RESULTS.md section 62).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import checkpoint_stem, load_checkpoint
from models.spectral import apply_masks, istft, stft, warp
from training.metrics import bss_eval
from training.music_data import Clip, MusicIndex, list_ensembles, load_audio, read_pairs
from training.separate import Query, separate_wave
from training.train import ratio_mask

# A test item: name, references (K, N), mixture (N,), and per source its feature stems.
Item = dict


def spread(seq: list, n: int | None) -> list:
    """n items evenly spaced over seq (all when n is None or >= len): a subset that keeps
    every class, unlike the first n rows of a class-ordered list."""
    if n is None or n >= len(seq):
        return list(seq)
    return [seq[int(i)] for i in np.linspace(0, len(seq) - 1, n).round()]


def parse_ckpt(spec: str) -> tuple[str, list[Path]]:
    """--ckpt LABEL=PATH[+PATH...] -> (label, checkpoint stems). Split at the last '=', so that
    a label may hold one ("trained on K=3"); every checkpoint's .json must exist. Several
    paths make one row of their averaged masks (MaskEnsemble)."""
    label, _, paths = spec.rpartition("=")
    if not label or not paths or "" in paths.split("+"):
        raise ValueError(f"--ckpt {spec!r}: expected LABEL=PATH or LABEL=PATH+PATH")
    stems = [checkpoint_stem(p) for p in paths.split("+")]
    for stem in stems:
        if not stem.with_suffix(".json").is_file():
            raise ValueError(f"--ckpt {spec!r}: no checkpoint {stem}.json")
    return label, stems


class MaskEnsemble(torch.nn.Module):
    """Several separators of one grid and window as one: the mean of their masks (mean of
    estimates, since the masks are applied linearly to the same mixture spectrogram)."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        shapes = {(m.n_rows, m.n_frames) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"ensemble members differ in (rows, frames): {sorted(shapes)}")
        self.members = torch.nn.ModuleList(members)
        self.n_rows, self.n_frames = shapes.pop()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(*args).float() for m in self.members]).mean(0)


PAIRS_PER_CLASS = 10


def split_pairs(data: Path, split: str, per_class: int = PAIRS_PER_CLASS,
                seed: int = 0, partners: int = 1) -> list[tuple[Clip, Clip]]:
    """Pairs of one split's clips: per class (sorted), `per_class` of its clips drawn without
    replacement, each with a random clip of another class; fixed by the seed. partners > 1
    pairs each drawn clip with that many distinct partners: the first round is the
    partners=1 set, unchanged, and each later round adds one new partner per clip (more
    mixtures from the same clips, as the test pairs give each test clip two)."""
    by_class = MusicIndex.from_csv(data / f"{split}.csv").by_class()
    if len(by_class) < 2:
        raise ValueError(f"{data / f'{split}.csv'}: pairs need clips of >= 2 classes")
    rng = np.random.default_rng(seed)
    others = {name: [c for other, cs in sorted(by_class.items()) if other != name for c in cs]
              for name in by_class}
    pairs = []
    for name in sorted(by_class):
        own = by_class[name]
        for i in rng.choice(len(own), min(per_class, len(own)), replace=False):
            pairs.append((own[int(i)], others[name][int(rng.integers(len(others[name])))]))
    firsts = list(pairs)
    for _ in range(partners - 1):
        for a, _b in firsts:
            # No clip already mixed with `a`, on either side (b + a is the same mixture as a + b).
            taken = {c.clip_id for pair in pairs if a in pair for c in pair}
            free = [c for c in others[a.class_name] if c.clip_id not in taken]
            if not free:
                raise ValueError(f"--partners {partners}: {a.clip_id} has no partner left "
                                 "that would make a new mixture; ask for fewer")
            pairs.append((a, free[int(rng.integers(len(free)))]))
    return pairs


def load_items(data: Path, seconds: float, max_pairs: int | None, max_ensembles: int | None,
               features: Path | None = None, pairs_from: str = "test", partners: int = 1
               ) -> tuple[list[Item], list[Item]]:
    """Test pairs (sums of two solo clips) and ensemble clips, cut to `seconds`; max_pairs /
    max_ensembles pick evenly spaced subsets; queries from `features` (<data>/features by
    default). pairs_from "train" / "val": split_pairs of that split instead of the test pairs
    (they have no detector features: their "det" stems are missing), each clip with
    `partners` partners."""
    feats = features or data / "features"
    n_max = round(seconds * 11025)
    pairs = []
    listed = (read_pairs(data / "test_pairs.csv") if pairs_from == "test"
              else split_pairs(data, pairs_from, partners=partners))
    for a, b in spread(listed, max_pairs):
        wa, wb = load_audio(a), load_audio(b)
        n = min(len(wa), len(wb), n_max)
        refs = np.stack([wa[:n], wb[:n]])
        pairs.append({"name": f"{a.clip_id}+{b.clip_id}", "refs": refs, "mix": refs.sum(0),
                      "classes": [a.class_name, b.class_name],
                      "gt": [feats / "gt" / c.class_name / c.clip_id for c in (a, b)],
                      "det": [[feats / "det" / c.class_name / c.clip_id] for c in (a, b)]})
    ens = []
    for e in spread(list_ensembles(data), max_ensembles):
        mix = load_audio(e.as_clip())
        n = min(len(mix), n_max)
        refs = np.stack([load_audio(e.stem_path(c))[:n] for c in e.classes])
        det_dir = feats / "det" / "ensembles" / e.clip_id
        ens.append({"name": e.clip_id, "refs": refs, "mix": mix[:n], "classes": e.classes,
                    "gt": [feats / "gt" / "ensembles" / e.clip_id / c for c in e.classes],
                    # A stem is estimated by the detected track of its class, if any.
                    "det": [[det_dir / c] if (det_dir / f"{c}.obj.npy").is_file() else []
                            for c in e.classes]})
    return pairs, ens


def query_from(stem: Path, names: list[str], class_name: str) -> Query:
    cls_file = Path(f"{stem}.cls.npy")
    cls = int(np.load(cls_file)) if cls_file.is_file() else names.index(class_name)
    return Query(np.load(f"{stem}.obj.npy"), cls, np.load(f"{stem}.motion.npy"))


# ------------------------------------------------------------------------------- baselines
def irm(item: Item) -> np.ndarray:
    """Ideal ratio mask |S_k| / sum_j |S_j| (clamped to 1) on the mixture, mixture phase."""
    refs = torch.from_numpy(item["refs"]).float()
    spec_src = stft(refs)  # (K, 512, T)
    spec_mix = stft(torch.from_numpy(item["mix"]).float())
    mask = (spec_src.abs() / spec_src.abs().sum(0, keepdim=True).clamp_min(1e-8)).clamp(0, 1)
    return istft(mask * spec_mix, refs.shape[-1]).numpy()


def irm_grid(item: Item, n_rows: int = 128, target: str = "mix") -> np.ndarray:
    """The training target as an oracle: the ratio mask of training.train.ratio_mask (mix:
    |S_k| / |S_mix| clamped to [0, 1]; sources: |S_k| / sum_j |S_j|) on the model's warped
    grid of n_rows log-frequency rows, unwarped and applied to the mixture as the model's
    masks are. The best a perfect separator of that resolution trained on it can do."""
    refs = torch.from_numpy(item["refs"]).float()
    spec_mix = stft(torch.from_numpy(item["mix"]).float())
    mag_src = warp(stft(refs).abs()[None], n_rows)  # (1, K, n_rows, T)
    mag_mix = warp(spec_mix.abs()[None, None], n_rows)
    mask = ratio_mask(mag_src, mag_mix, target)
    return istft(apply_masks(mask, spec_mix[None])[0], refs.shape[-1]).numpy()


def nmf_oracle(item: Item, n_components: int = 24, seed: int = 0) -> np.ndarray:
    """Audio-only NMF (KL, multiplicative updates) of the mixture magnitude; each component is
    given to the source whose ideal ratio mask holds most of its energy (ORACLE assignment:
    an upper bound for NMF with a blind clustering), then Wiener-like masks."""
    from sklearn.decomposition import NMF

    mix = torch.from_numpy(item["mix"]).float()
    spec_mix = stft(mix)
    mag = spec_mix.abs().numpy().astype(np.float64) + 1e-9  # (512, T)
    nmf = NMF(n_components=n_components, beta_loss="kullback-leibler", solver="mu",
              init="nndsvda", max_iter=200, random_state=seed)
    w = nmf.fit_transform(mag)  # (512, C)
    h = nmf.components_  # (C, T)
    refs = torch.from_numpy(item["refs"]).float()
    src_mag = stft(refs).abs().numpy()
    ideal = src_mag / np.maximum(src_mag.sum(0, keepdims=True), 1e-8)  # (K, 512, T)
    comps = w.T[:, :, None] * h[:, None, :]  # (C, 512, T)
    owner = np.einsum("cft,kft->ck", comps, ideal).argmax(1)
    total = comps.sum(0) + 1e-9
    k = len(refs)
    masks = np.stack([comps[owner == j].sum(0) / total for j in range(k)])
    est = torch.from_numpy(masks).float() * spec_mix[None]
    return istft(est, mix.shape[-1]).numpy()


def model_estimates(model: torch.nn.Module, item: Item, naming: str, names: list[str]
                    ) -> np.ndarray:
    """Estimates (K, N): each source = the sum of the estimates of its queries (none: silence).
    All queries of a mixture are decoded in one pass."""
    queries, owner = [], []
    for k, stems in enumerate(item[naming] if naming == "det" else
                              [[s] for s in item["gt"]]):
        for s in stems:
            queries.append(query_from(s, names, item["classes"][k]))
            owner.append(k)
    out = np.zeros_like(item["refs"])
    if not queries:
        return out
    est = separate_wave(model, item["mix"], queries)
    for q, k in enumerate(owner):
        out[k] += est[q]
    return out


# --------------------------------------------------------------------------------- scoring
def score_row(items: list[Item], estimate: Callable[[Item], np.ndarray]) -> dict:
    """Mean SDR / SIR / SAR over every source of `items`, and "per_source": [item name, class,
    SDR, SIR, SAR] for each (kept in the row cache, for breakdowns)."""
    per_source = []
    for it in items:
        m = bss_eval(it["refs"], estimate(it))
        per_source += [[it["name"], c, *(float(m[k][j]) for k in ("sdr", "sir", "sar"))]
                       for j, c in enumerate(it["classes"])]
    sdr, sir, sar = np.array([p[2:] for p in per_source]).T
    return {"sdr": float(sdr.mean()), "sir": float(sir.mean()), "sar": float(sar.mean()),
            "sdr_median": float(np.median(sdr)), "n_sources": len(sdr), "per_source": per_source}


def read_per_source(path: Path) -> list[list]:
    """A row cache's "per_source" entries (score_row), or a one-line error for older rows."""
    row = json.loads(Path(path).read_text())
    if "per_source" not in row:
        raise SystemExit(f"error: {path} has no per-source scores: delete it and re-run "
                         "training.evaluate")
    return row["per_source"]


def source_clips(per_source: list[list]) -> list[str]:
    """The clip each per_source entry was cut from: a pair "a+b"'s sources are a, then b (the
    order score_row writes them in); an ensemble's stems share its clip."""
    seen: dict[str, int] = {}  # sources of each mixture so far: the next one's index
    clips = []
    for name, *_ in per_source:
        j = seen[name] = seen.get(name, -1) + 1
        parts = name.split("+")
        clips.append(parts[j] if len(parts) > 1 else name)
    return clips


def to_markdown(results: dict) -> str:
    lines = []
    for part in ("pairs", "ensembles"):
        rows = results[part]
        if not rows:
            continue
        lines += [f"### {part} ({results['n_' + part]} clips, first {results['seconds']} s)", "",
                  "| row | SDR | SIR | SAR | SDR median |", "|---|---:|---:|---:|---:|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['sdr']:.2f} | {r['sir']:.2f} | {r['sar']:.2f} | "
                         f"{r['sdr_median']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="SynthMUSIC (or MUSIC) root")
    ap.add_argument("--ckpt", action="append", default=[],
                    help="LABEL=PATH of a checkpoint stem (repeatable); LABEL=PATH+PATH scores "
                         "the mean of several separators' masks (a seed ensemble)")
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for results.json and results.md (rows cached by label)")
    ap.add_argument("--seconds", type=float, default=6.0, help="evaluate the first S seconds")
    ap.add_argument("--max-pairs", type=int, default=None,
                    help="score the first N pairs only (default all)")
    ap.add_argument("--max-ensembles", type=int, default=None,
                    help="score the first N ensemble clips only (default all; 0: none)")
    ap.add_argument("--baselines", default="mixture,irm,irm_grid,nmf",
                    help="comma-separated from mixture, irm, irm_grid (the training target on "
                         "the cpu preset's 128-row grid), irm_grid256 (the same on the paper's "
                         "256 rows), irm_grid256_sources (the --mask-target sources target on "
                         "256 rows), irm_grid512 (512 rows, as many as linear bins), nmf")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--pairs-from", default="test", choices=["test", "train", "val"],
                    help="test: the fixed test pairs (default); train / val: 10 pairs per class "
                         "of that split's clips (seed 0), GT-named rows only, to measure the "
                         "generalisation gap; rows are cached by label, so give another --out")
    ap.add_argument("--partners", type=int, default=1,
                    help="with --pairs-from train / val: pair each clip with N distinct clips "
                         "of other classes (default 1; the first N=1 pairs are kept, so N=4 "
                         "is 4x the mixtures of the same clips: a finer choice between runs, "
                         "with --seconds 12 for whole clips)")
    ap.add_argument("--features", type=Path, default=None,
                    help="feature cache of the queries (default <data>/features), e.g. one "
                         "re-encoded with a motion encoder trained end to end; rows are cached "
                         "by label under --out, so give another --out per cache")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from training.instruments import load_vocabulary

    names = [inst.name for inst in load_vocabulary()]
    if args.partners < 1 or (args.partners > 1 and args.pairs_from == "test"):
        raise SystemExit("error: --partners N >= 1, and above 1 only with --pairs-from "
                         "train / val (the test pairs are fixed)")
    if args.pairs_from != "test" and args.max_ensembles != 0:
        raise SystemExit(f"error: --pairs-from {args.pairs_from} scores pairs only: add "
                         "--max-ensembles 0")
    pairs, ens = load_items(args.data, args.seconds, args.max_pairs, args.max_ensembles,
                            args.features, args.pairs_from, args.partners)
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[str, Callable[[Item], np.ndarray]]] = []
    base = {"mixture": lambda it: np.stack([it["mix"]] * len(it["refs"])),
            "irm": irm, "irm_grid": irm_grid, "irm_grid256": lambda it: irm_grid(it, 256),
            "irm_grid256_sources": lambda it: irm_grid(it, 256, "sources"),
            "irm_grid512": lambda it: irm_grid(it, 512), "nmf": nmf_oracle}
    labels = {"mixture": "Mixture", "irm": "Ideal ratio mask (oracle)",
              "irm_grid": "Ideal ratio mask on the cpu model's 128-row grid (oracle)",
              "irm_grid256": "Ideal ratio mask on the paper preset's 256-row grid (oracle)",
              "irm_grid256_sources":
                  "Ratio mask over the sum of the sources on the 256-row grid (oracle)",
              "irm_grid512": "Ideal ratio mask on a 512-row grid (oracle)",
              "nmf": "NMF, oracle component assignment (upper bound)"}
    for b in filter(None, args.baselines.split(",")):
        if b not in base:
            raise SystemExit(f"error: unknown baseline {b!r}; choose from {sorted(base)}")
        jobs.append((labels[b], base[b]))
    for spec in args.ckpt:
        try:
            label, stems = parse_ckpt(spec)
            members = [load_checkpoint(stem)[0] for stem in stems]
            model = members[0] if len(members) == 1 else MaskEnsemble(members).eval()
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        namings = (("det", "detector-named"), ("gt", "GT-named"))
        for naming, desc in namings[args.pairs_from != "test":]:  # no detector outside test
            jobs.append((f"{label} ({desc})",
                         lambda it, m=model, n=naming: model_estimates(m, it, n, names)))

    results: dict = {"seconds": args.seconds, "n_pairs": len(pairs), "n_ensembles": len(ens),
                     "pairs": {}, "ensembles": {}, "command": "python -m training.evaluate "
                     + " ".join(sys.argv[1:])}
    for label, fn in jobs:
        for part, items in (("pairs", pairs), ("ensembles", ens)):
            if not items:
                continue
            # The key names the item set, so rows of another subset are never mixed in.
            key = ("".join(ch if ch.isalnum() else "_" for ch in label)
                   + f".{part}{len(items)}.{args.seconds:g}s")
            cache = rows_dir / f"{key}.json"
            if cache.is_file():
                row = json.loads(cache.read_text())
            else:
                t0 = time.time()
                row = score_row(items, fn)
                row["seconds"] = round(time.time() - t0, 1)
                cache.write_text(json.dumps(row) + "\n")
            results[part][label] = {k: v for k, v in row.items() if k != "per_source"}
            print(f"{part:9s} {label:55s} SDR {row['sdr']:6.2f} SIR {row['sir']:6.2f} "
                  f"SAR {row['sar']:6.2f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(to_markdown(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
