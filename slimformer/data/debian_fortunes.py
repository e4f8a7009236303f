"""Debian's fortune files as a text corpus: the source of the packaged 1,200-text sample, and (all 12,000+
cleaned texts) the `debian-fortunes` text source recovery trains on when the Debian package is installed.

Files: /usr/share/games/fortunes (packages `fortunes`, `fortunes-min`; BSD license), entries separated by
lines holding only `%`. Cleaning joins an entry into one line, drops overstrike and control characters,
and keeps 40-400 characters that are mostly letters and digits (no ASCII art); texts are de-duplicated
case-insensitively across files. The packaged sample was drawn from exactly these cleaned texts, so a
packaged text compares equal to its Debian original (held-out texts can be excluded by equality).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from slimformer.errors import SlimformerError

DEFAULT_FORTUNES_DIR = Path("/usr/share/games/fortunes")
MIN_CHARS = 40
MAX_CHARS = 400
MIN_ALNUM_FRACTION = 0.6  # letters+digits / non-space characters; below this an entry is ascii art
# Categories left out on purpose: non-English quotes without translations.
EXCLUDED_CATEGORIES = frozenset({"translate-me"})

_OVERSTRIKE = re.compile(r"[^\n]\x08")  # "_\bX" (underline) and "X\bX" (bold) -> "X"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_WHITESPACE = re.compile(r"\s+")


def fortune_files(fortunes_dir: Path) -> list[Path]:
    """The plain-text fortune files in ``fortunes_dir`` (no ``.dat``/``.u8`` indexes, no sub-folders)."""
    files = [] if not fortunes_dir.is_dir() else [
        p for p in sorted(fortunes_dir.iterdir())
        if p.is_file() and p.suffix not in {".dat", ".u8"} and p.name not in EXCLUDED_CATEGORIES]
    if not files:
        raise SlimformerError(f"no fortune files in {fortunes_dir}; install Debian's fortunes package "
                              "(apt-get install fortunes) or use the packaged sample (source: fortunes)")
    return files


def split_entries(raw: str) -> list[str]:
    """Split a fortune file into raw entries (separator: a line holding only ``%``)."""
    entries: list[str] = []
    current: list[str] = []
    for line in raw.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return entries


def clean_entry(entry: str) -> str | None:
    """Normalise one fortune to a single line; ``None`` when it should be dropped."""
    text = _OVERSTRIKE.sub("", entry)
    text = _CONTROL.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip()
    if not MIN_CHARS <= len(text) <= MAX_CHARS:
        return None
    if "\ufffd" in text:  # undecodable bytes
        return None
    visible = [c for c in text if not c.isspace()]
    alnum = sum(c.isalnum() for c in visible)
    if alnum / len(visible) < MIN_ALNUM_FRACTION:
        return None
    return text


def collect_fortunes(fortunes_dir: Path = DEFAULT_FORTUNES_DIR) -> dict[str, list[str]]:
    """Cleaned, globally de-duplicated fortunes per category (file name), in file order."""
    seen: set[str] = set()
    by_category: dict[str, list[str]] = {}
    for path in fortune_files(fortunes_dir):
        raw = path.read_bytes().decode("utf-8", errors="replace")
        kept: list[str] = []
        for entry in split_entries(raw):
            text = clean_entry(entry)
            if text is None:
                continue
            key = text.casefold()
            if key in seen:
                continue
            seen.add(key)
            kept.append(text)
        if kept:
            by_category[path.name] = kept
    return by_category


@lru_cache(maxsize=2)
def debian_fortunes(fortunes_dir: Path = DEFAULT_FORTUNES_DIR) -> tuple[str, ...]:
    """Every cleaned fortune, categories in name order (read once per process)."""
    by_category = collect_fortunes(fortunes_dir)
    return tuple(t for name in sorted(by_category) for t in by_category[name])


def installed(fortunes_dir: Path = DEFAULT_FORTUNES_DIR) -> bool:
    """Whether Debian's fortune files are there to read."""
    try:
        return bool(fortune_files(fortunes_dir))
    except SlimformerError:
        return False
