"""The small face pack shipped inside the package (``rlrestore/assets/faces``), for runs without data."""

from __future__ import annotations

from pathlib import Path

FACES_DIR = Path(__file__).resolve().parent.parent / "assets" / "faces"


def embedded_faces_dir() -> Path:
    """Directory of the embedded faces (PNG files plus their ``SOURCES.md`` attribution)."""
    if not FACES_DIR.is_dir() or not any(FACES_DIR.glob("*.png")):
        raise FileNotFoundError(
            f"embedded face pack missing or empty at {FACES_DIR}; rebuild it with "
            "`python scripts/build_face_pack.py` or set data.shards to a directory of built shards"
        )
    return FACES_DIR
