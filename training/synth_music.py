"""SynthMUSIC sound: melodies from music21's bundled corpus, arranged per instrument, rendered
with a General MIDI SoundFont (tinysoundfont) to mono float audio.

Melodies are extracted once (parsing the corpus is the slow part) and cached as JSON note lists
`[pitch, onset, duration]` in quarter notes; everything after that is seeded and cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.instruments import Instrument

SAMPLE_RATE = 11025
CACHE_VERSION = 1
DEB_SOUNDFONT = "fluid-soundfont-gm"
DEFAULT_SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")

# Bounded corpus selections: (music21 composer/collection, number of files, parts per score).
# 'bach' are four-part chorales (each voice is one line); the others are single-line tunes.
MELODY_SETS: dict[str, list[tuple[str, int]]] = {
    "tiny": [("bach", 6), ("ryansMammoth", 10)],
    "default": [("bach", 60), ("ryansMammoth", 160), ("essenFolksong", 1)],
}
SPLITS = ("train", "val", "test")
MIN_NOTES = 12


@dataclass(frozen=True)
class Melody:
    """One monophonic line: `notes` rows are (MIDI pitch, onset, duration) in quarter notes."""

    source: str  # corpus file (relative to music21's corpus) + '#' + part / tune number
    unit: str  # the corpus file: the unit that splits train / val / test, so no tune leaks
    notes: list[tuple[int, float, float]]



def _monophonic(events: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """Keep the highest note per onset and cut each note at the next onset."""
    by_onset: dict[float, tuple[int, float]] = {}
    for pitch, onset, dur in events:
        if dur <= 0:
            continue  # grace notes
        if onset not in by_onset or pitch > by_onset[onset][0]:
            by_onset[onset] = (pitch, dur)
    onsets = sorted(by_onset)
    out = []
    for i, onset in enumerate(onsets):
        pitch, dur = by_onset[onset]
        if i + 1 < len(onsets):
            dur = min(dur, onsets[i + 1] - onset)
        out.append((pitch, round(onset, 4), round(dur, 4)))
    return out


def _line_notes(stream) -> list[tuple[int, float, float]]:
    """Notes of one music21 stream (part or tune), ties merged, chords reduced to their top."""
    events: list[tuple[int, float, float]] = []
    for n in stream.flatten().notes:
        pitch = max(p.midi for p in n.pitches) if n.isChord else n.pitch.midi
        onset, dur = float(n.offset), float(n.duration.quarterLength)
        tie = getattr(n, "tie", None)
        if tie is not None and tie.type in ("continue", "stop") and events:
            p0, o0, d0 = events[-1]
            if p0 == pitch and abs(o0 + d0 - onset) < 1e-6:
                events[-1] = (p0, o0, d0 + dur)
                continue
        events.append((pitch, onset, dur))
    return _monophonic(events)


def extract_melodies(set_name: str) -> list[Melody]:
    """Parse the bounded corpus selection `set_name` (slow: seconds to ~half a minute)."""
    if set_name not in MELODY_SETS:
        raise ValueError(f"melody set {set_name!r}; allowed: {sorted(MELODY_SETS)}")
    from music21 import converter, corpus  # heavy import, only needed to fill the cache

    root = Path(corpus.__file__).parent
    melodies: list[Melody] = []
    for collection, n_files in MELODY_SETS[set_name]:
        for path in sorted(corpus.getComposer(collection))[:n_files]:
            unit = str(Path(path).relative_to(root))
            parsed = converter.parse(path)
            if hasattr(parsed, "scores"):  # an Opus: a file of many tunes
                lines = [(f"tune{i}", s) for i, s in enumerate(parsed.scores)]
            elif collection == "bach":
                lines = [(f"part{i}", p) for i, p in enumerate(parsed.parts)]
            else:
                lines = [("tune0", parsed)]
            for tag, line in lines:
                notes = _line_notes(line)
                if len(notes) >= MIN_NOTES:
                    melodies.append(Melody(f"{unit}#{tag}", unit, notes))
    return melodies


def load_melodies(set_name: str, cache_path: Path) -> list[Melody]:
    """Melodies of `set_name`, from the JSON cache when it holds that set, else parsed + cached."""
    if cache_path.is_file():
        data = json.loads(cache_path.read_text())
        if data.get("version") == CACHE_VERSION and data.get("set") == set_name:
            return [
                Melody(m["source"], m["unit"], [tuple(n) for n in m["notes"]])
                for m in data["melodies"]
            ]
    melodies = extract_melodies(set_name)
    data = {
        "version": CACHE_VERSION,
        "set": set_name,
        "melodies": [{"source": m.source, "unit": m.unit, "notes": m.notes} for m in melodies],
    }
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, cache_path)
    return melodies


def melodies_by_split(melodies: list[Melody]) -> dict[str, list[Melody]]:
    """Melodies grouped 8 : 1 : 1 by corpus file (files ranked by a stable hash), so that no
    tune is shared between splits; a split left empty (tiny selections) borrows training's."""
    units = sorted({m.unit for m in melodies}, key=lambda u: hashlib.sha1(u.encode()).digest())
    split_of = {u: ("train", "train", "train", "train", "train", "train", "train", "train",
                    "val", "test")[i % 10] for i, u in enumerate(units)}
    groups = {s: [m for m in melodies if split_of[m.unit] == s] for s in SPLITS}
    if not groups["train"]:
        raise ValueError("the melody selection has no training melodies")
    for s in SPLITS:
        groups[s] = groups[s] or groups["train"]
    return groups


@dataclass
class Part:
    """An arranged part: note events in seconds, ready to render, and how it was made."""

    events: list[tuple[int, float, float, int]]  # (MIDI key, onset s, duration s, velocity)
    sources: list[str]
    tempo_bpm: float
    transpose: int


def _fold(pitch: int, lo: int, hi: int) -> int:
    while pitch < lo:
        pitch += 12
    while pitch > hi:
        pitch -= 12
    return pitch


def _drum_key(inst: Instrument, onset_q: float, rng: np.random.Generator) -> int:
    """A percussion key by metric weight: strong beats take the first keys of the class."""
    keys = inst.notes
    if len(keys) == 1:
        return keys[0]
    frac = onset_q % 1.0
    if abs(frac) < 1e-6:
        beat = round(onset_q) % 4
        # kit convention in the vocabulary order: low keys (kick, snare) first, cymbals last
        pool = keys[: max(1, len(keys) // 3)] if beat in (0, 2) else keys[: max(2, len(keys) // 2)]
    else:
        pool = keys[len(keys) // 2 :]
    if rng.random() < 0.1:
        pool = keys
    return int(pool[rng.integers(len(pool))])


def arrange(
    inst: Instrument,
    pool: list[Melody],
    duration_s: float,
    rng: np.random.Generator,
    tempo_bpm: float | None = None,
) -> Part:
    """Fill `duration_s` with corpus melodies for `inst`: random tempo, key, start, velocity.

    Rests of the source are kept; when a melody ends before the clip does, another one follows
    after a short rest. Drum classes play the melodies' rhythm on their percussion keys.
    """
    bpm = float(tempo_bpm if tempo_bpm is not None else rng.uniform(70.0, 160.0))
    spq = 60.0 / bpm  # seconds per quarter note
    vel_base = rng.uniform(64, 110)
    legato = rng.uniform(0.8, 1.0)
    transpose = 0
    if inst.pitch is not None:
        lo, hi = inst.pitch
        transpose_target = rng.uniform(lo + 6, hi - 6)
    events: list[tuple[int, float, float, int]] = []
    sources: list[str] = []
    t0 = float(rng.uniform(0.0, 0.4))  # first onset: clips do not all start on a downbeat
    while t0 < duration_s:
        mel = pool[rng.integers(len(pool))]
        notes = mel.notes
        start = int(rng.integers(max(1, len(notes) - MIN_NOTES)))
        origin = notes[start][1]
        sources.append(f"{mel.source}@{start}")
        if inst.pitch is not None:
            median = float(np.median([n[0] for n in notes]))
            transpose = round(transpose_target - median)
        last_end = t0
        for pitch, onset_q, dur_q in notes[start:]:
            if rng.random() < 0.03:  # the player pauses: a phrase rest of 2-6 beats
                origin -= rng.uniform(2.0, 6.0)
            onset = t0 + (onset_q - origin) * spq + rng.normal(0.0, 0.008)
            if onset >= duration_s:
                break
            onset = max(onset, 0.0)
            accent = 8.0 if abs(onset_q % 1.0) < 1e-6 else 0.0
            vel = int(np.clip(vel_base + accent + rng.normal(0.0, 6.0), 30, 127))
            if inst.is_drums:
                key, dur = _drum_key(inst, onset_q - origin, rng), 0.12
            else:
                key = _fold(pitch + transpose, *inst.pitch)
                dur = max(0.05, dur_q * spq * legato)
            events.append((key, onset, dur, vel))
            last_end = max(last_end, onset + dur)
        t0 = last_end + rng.uniform(0.5, 2.0) * spq
    return Part(events, sources, bpm, transpose)


class Renderer:
    """A SoundFont loaded once; renders one part at a time into mono float32 at 11025 Hz."""

    def __init__(self, soundfont: str | Path = DEFAULT_SOUNDFONT, sample_rate: int = SAMPLE_RATE):
        soundfont = Path(soundfont)
        if not soundfont.is_file():
            raise FileNotFoundError(
                f"SoundFont not found: {soundfont}; install the Debian package {DEB_SOUNDFONT} "
                "(apt-get install fluid-soundfont-gm) or pass --soundfont FILE.sf2"
            )
        if soundfont.suffix.lower() not in (".sf2", ".sf3"):
            raise ValueError(f"SoundFont {soundfont}: suffix must be .sf2 or .sf3")
        import tinysoundfont

        self.sample_rate = sample_rate
        self.synth = tinysoundfont.Synth(samplerate=sample_rate)
        self.sfid = self.synth.sfload(str(soundfont))

    def render(self, inst: Instrument, events: list[tuple[int, float, float, int]],
               n_samples: int) -> np.ndarray:
        """Note events -> (n_samples,) float32 mono. Deterministic: state is reset per call."""
        chan = 9 if inst.is_drums else 0
        synth = self.synth
        synth.sounds_off()
        for c in range(16):
            synth.control_change(c, 121, 0)  # reset controllers: no state carries between clips
        synth.generate(2048)  # killed voices fade out over a block: flush them, so clips repeat
        if inst.is_drums:
            synth.program_select(chan, self.sfid, 128, 0, is_drums=True)
        else:
            synth.program_select(chan, self.sfid, 0, int(inst.gm_program))
        timeline = []
        for key, onset, dur, vel in events:
            timeline.append((round(onset * self.sample_rate), 1, key, vel))
            timeline.append((round((onset + dur) * self.sample_rate), 0, key, 0))
        timeline.sort(key=lambda e: (e[0], e[1]))  # note-offs first at equal times: re-strikes
        out = np.zeros((n_samples, 2), np.float32)  # (samples, L/R)
        pos = 0
        for sample, on, key, vel in timeline + [(n_samples, -1, 0, 0)]:
            sample = min(sample, n_samples)
            if sample > pos:
                buf = synth.generate(sample - pos)
                out[pos:sample] = np.frombuffer(buf, np.float32).reshape(-1, 2)
                pos = sample
            if on == 1:
                synth.noteon(chan, key, vel)
            elif on == 0:
                synth.noteoff(chan, key)
        synth.sounds_off()
        return out.mean(axis=1)


def normalise(audio: np.ndarray, target_dbfs: float, peak: float = 0.9) -> tuple[np.ndarray, float]:
    """Scale to an RMS of `target_dbfs` (over the sounding part), limited so |peak| <= `peak`.

    Returns the scaled audio and the gain applied.
    """
    frame = 256
    n = len(audio) // frame * frame
    rms_frames = np.sqrt(np.mean(audio[:n].reshape(-1, frame) ** 2, axis=1) + 1e-20)
    active = rms_frames > rms_frames.max() * 10 ** (-40 / 20)
    rms = float(np.sqrt(np.mean(rms_frames[active] ** 2))) if active.any() else 0.0
    if rms <= 0.0:
        return audio.astype(np.float32), 1.0
    gain = 10 ** (target_dbfs / 20) / rms
    top = float(np.abs(audio).max()) * gain
    if top > peak:
        gain *= peak / top
    return (audio * gain).astype(np.float32), float(gain)
