"""The instrument vocabulary (SynthMUSIC classes): read instruments.toml into typed records.

The class id of an instrument is its position in the file, so the order of the TOML tables is
part of the contract shared by the generator, the detector classes and every evaluation.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VOCABULARY = Path(__file__).with_name("instruments.toml")


@dataclass(frozen=True)
class Instrument:
    """One class: its sound (GM program or drum kit keys) and its look (an emoji glyph)."""

    class_id: int
    name: str
    gm_program: int | str  # 0-based General MIDI program, or "drums" (channel 10 kit)
    emoji: str
    pitch: tuple[int, int] | None  # MIDI range melodies are moved into (melodic classes)
    notes: tuple[int, ...]  # GM percussion keys (drum classes); empty for melodic classes

    @property
    def is_drums(self) -> bool:
        return self.gm_program == "drums"


def _parse_entry(class_id: int, name: str, table: dict, path: Path) -> Instrument:
    where = f"{path} [{name}]"
    program = table.get("gm_program")
    if not (program == "drums" or (isinstance(program, int) and 0 <= program <= 127)):
        raise ValueError(f"{where}: gm_program={program!r}; allowed: an int 0..127 or 'drums'")
    emoji = table.get("emoji")
    if not isinstance(emoji, str) or not emoji:
        raise ValueError(f"{where}: emoji={emoji!r}; allowed: a non-empty string")
    pitch = table.get("pitch")
    notes = table.get("notes", [])
    if program == "drums":
        if not notes or not all(isinstance(k, int) and 0 <= k <= 127 for k in notes):
            raise ValueError(f"{where}: notes={notes!r}; a drum class needs MIDI keys 0..127")
        pitch_range = None
    else:
        ok = (
            isinstance(pitch, list)
            and len(pitch) == 2
            and all(isinstance(p, int) and 0 <= p <= 127 for p in pitch)
            and pitch[1] - pitch[0] >= 12
        )
        if not ok:
            raise ValueError(
                f"{where}: pitch={pitch!r}; a melodic class needs [low, high] MIDI notes "
                "0..127 spanning at least an octave"
            )
        pitch_range = (pitch[0], pitch[1])
    return Instrument(class_id, name, program, emoji, pitch_range, tuple(notes))


def load_vocabulary(path: str | Path | None = None) -> list[Instrument]:
    """Read the vocabulary; class ids follow the file order (0..N-1).

    path: a TOML file of one table per class; None reads the copy shipped with the project.
    """
    path = Path(path) if path is not None else DEFAULT_VOCABULARY
    if not path.is_file():
        raise FileNotFoundError(f"instrument vocabulary not found: {path}")
    with path.open("rb") as f:
        data = tomllib.load(f)
    if not data:
        raise ValueError(f"{path}: no instrument tables")
    return [_parse_entry(i, name, table, path) for i, (name, table) in enumerate(data.items())]


def class_names(path: str | Path | None = None) -> list[str]:
    """The class names in id order."""
    return [inst.name for inst in load_vocabulary(path)]
