"""Seeds for random draws, derived per named unit (a tensor, a LoRA module) from the run's seed.

Each unit draws from its own generator, so random masks never depend on the order or the thread in which
units are processed. The derivation is part of the output bytes: changing it changes every random merge.
"""

from __future__ import annotations

import hashlib


def derived_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for `name` under the run's `seed`: the first 8 bytes of sha256("seed:name")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
