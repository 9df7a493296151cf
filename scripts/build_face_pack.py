"""Build the embedded face pack ``rlrestore/assets/faces/`` from a folder of HQ faces.

Each face is centre-cropped, resized to ``--size`` px (Lanczos) and saved as an optimized PNG
with the same file stem; ``SOURCES.md`` (the licence attribution, which must travel with every
copy) is copied alongside under a header saying what this script changed. Output bytes depend
only on the inputs and the Pillow/zlib versions. Fails if the pack exceeds ``--max-mb``.

Run from the repository root with the package importable::

    PYTHONPATH=. python scripts/build_face_pack.py --src DIR [--size 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlrestore.data.images import ImageLoadError, encode_png, iter_image_files, load_image, square_resize

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = "SOURCES.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src",
        type=Path,
        required=True,
        help="folder of HQ faces, with their SOURCES.md (licence attribution) in it or in its parent",
    )
    parser.add_argument("--size", type=int, default=128, help="side of the square output faces in px")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "rlrestore" / "assets" / "faces",
        help="output folder (default: rlrestore/assets/faces)",
    )
    parser.add_argument("--max-mb", type=float, default=8.0, help="fail if the pack is larger than this")
    return parser.parse_args(argv)


def find_sources(src: Path) -> Path:
    """SOURCES.md in the face folder or its parent (a tree of hq/ and lq/ folders keeps it beside them)."""
    for candidate in (src / SOURCES, src.parent / SOURCES):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"no {SOURCES} in {src} or {src.parent}: the attribution must travel with the faces")


def sources_header(src: Path, size: int) -> str:
    return (
        "# Embedded face pack\n\n"
        f"The images in this folder are the `hq/` faces listed below, centre-cropped and resized to "
        f"{size}x{size} px (Lanczos) and re-saved as PNG by `scripts/build_face_pack.py` from "
        f"`{src.name}/`; file names are unchanged except that every file ends in `.png`. "
        "The `lq/` files listed below are not included. Their licences are unchanged: "
        "non-commercial research use only, keep this attribution with every copy.\n\n"
        "The original attribution follows, copied unchanged.\n\n---\n\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src, out = args.src.resolve(), args.out.resolve()
    files = iter_image_files(src)
    if not files:
        raise SystemExit(f"no images in {src}")
    sources = find_sources(src)

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):
        stale.unlink()
    names: set[str] = set()
    for path in files:
        name = path.relative_to(src).with_suffix(".png").name
        if name in names:
            raise SystemExit(f"two inputs map to {name}; the pack is flat, rename one in {src}")
        names.add(name)
        try:
            face = square_resize(load_image(path), args.size)
        except ImageLoadError as exc:
            raise SystemExit(str(exc)) from None
        (out / name).write_bytes(encode_png(face, optimize=True))
    (out / SOURCES).write_text(
        sources_header(src, args.size) + sources.read_text(encoding="utf-8"), encoding="utf-8"
    )

    total = sum(path.stat().st_size for path in out.iterdir() if path.is_file())
    print(f"wrote {len(files)} faces ({args.size} px) and {SOURCES} to {out}: {total / 1e6:.2f} MB")
    if total > args.max_mb * 1e6:
        print(
            f"error: pack is {total / 1e6:.2f} MB, above the {args.max_mb} MB limit; use a smaller --size",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
