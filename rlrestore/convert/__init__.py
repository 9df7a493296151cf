"""Convert released checkpoints into rlrestore policy directories (``rlrestore convert``).

Formats (:mod:`rlrestore.convert.formats`): ``pref-restore`` (the released Pref-Restore model) and
``blip3o-next`` (its base model), both BLIP3o-family HF Trainer directories converted by
:mod:`rlrestore.convert.blip3o`, with the key mapping and checks of :mod:`rlrestore.convert.keymap`.
Every source tensor is used, checked as a duplicate, or left out for a stated reason, else the
conversion is refused naming the keys; shapes are checked; nothing is downloaded and no pickled
code runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rlrestore.convert.formats import FORMATS

if TYPE_CHECKING:
    from rlrestore.convert.writer import ConversionReport

__all__ = ["FORMATS", "convert"]


def convert(
    format_name: str, src: str | None, out: str | Path, sana: str | None = None, ta_tok: str | None = None
) -> ConversionReport:
    """Convert checkpoint ``src`` (default: the format's released repo id) of ``format_name`` into the
    policy directory ``out``."""
    from rlrestore.convert.blip3o import convert_blip3o
    from rlrestore.convert.sources import ConversionError

    if format_name not in FORMATS:
        raise ConversionError(f"unknown format {format_name!r}; choose from {', '.join(FORMATS)}")
    fmt = FORMATS[format_name]
    return convert_blip3o(fmt, src or fmt.repo, Path(out), sana=sana, ta_tok=ta_tok)
