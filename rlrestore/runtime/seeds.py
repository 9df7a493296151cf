"""Stable seeds: the same parts give the same seed in every process, on every machine.

Python's ``hash`` changes with ``PYTHONHASHSEED``; these seeds are blake2b digests of the parts'
``str()`` joined by a separator, cut to 63 bits, so resumed runs and Ray workers draw the same
batches, noise and degradations as the run that came before.
"""

from __future__ import annotations

import hashlib

UNIT_SEPARATOR = "\x1f"  # ASCII unit separator: never part of a file name or sample id


def derived_seed(*parts: object, separator: str = "/") -> int:
    """A stable 63-bit seed from any parts: blake2b (8 bytes) of ``separator.join(map(str, parts))``.

    Training seeds (batches, Stage 1 noise, Stage 2 candidates and NFT timesteps) use the default
    ``/``; ``sample_seed`` uses the unit separator, since sample ids may hold ``/``.
    """
    digest = hashlib.blake2b(separator.join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seed(base_seed: int, sample_id: str, epoch: int) -> int:
    """Seed of one sample's Eq. 16 degradation in one epoch: ``derived_seed`` of (base seed, id, epoch)
    joined by the unit separator, so ids such as ``folder/face`` cannot collide."""
    return derived_seed(base_seed, sample_id, epoch, separator=UNIT_SEPARATOR)
