"""The per-unit seed derivation is part of every random merge's bytes: pinned here, shared by merges and LoRA."""

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from mergegate._seeds import derived_seed


def test_derived_seeds_are_pinned():
    assert derived_seed(0, "model.layers.0.mlp.up_proj.weight") == 2826254160607379106
    assert derived_seed(7, "q_proj") == 8809131917918520798
    assert derived_seed(-1, "") == 4379540180786135109


@given(st.integers(), st.text())
def test_derived_seed_is_the_first_8_bytes_of_sha256_as_a_63_bit_integer(seed, name):
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    assert derived_seed(seed, name) == int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
