"""Numbers derived from a hash of their inputs: the same on every machine, process and Python version.

Image seeds, split membership, slot draws, training noise, augmentation crops and rendezvous ports are all
functions of a few values (a seed, an index, a job id) rather than draws from a shared RNG, so any process
can compute any one of them alone, and a rerun or a resume gets the very same number. ``hash()`` cannot do
this (it is salted per process), hence a cryptographic hash of the values joined by ``:``.

Each caller keeps the exact byte string, hash, byte order and bit selection it has always used: the
values are on disk already (image names and seeds, split folders, checkpoints whose noise must continue),
so the parameters here describe today's derivations rather than pick a new one. At the bottom of the
package: it imports nothing from sdcluster.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Algorithm = Literal["sha256", "blake2b"]


def digest64(*parts: object, algorithm: Algorithm = "sha256") -> bytes:
    """Eight bytes of the hash of ``parts`` as text joined by ``:`` (``str`` of each part).

    ``sha256``: the first 8 bytes of its digest. ``blake2b``: blake2b asked for an 8-byte digest, which is
    not a prefix of its longer digests (the length is an input of blake2b), so it is named apart.
    """
    data = ":".join(map(str, parts)).encode()
    if algorithm == "blake2b":
        return hashlib.blake2b(data, digest_size=8).digest()
    return hashlib.sha256(data).digest()[:8]


def derive_int(
    *parts: object,
    bits: int = 64,
    byteorder: Literal["big", "little"] = "big",
    algorithm: Algorithm = "sha256",
) -> int:
    """An integer in ``[0, 2**bits)`` from ``parts``: the top ``bits`` of the 64-bit number that the
    :func:`digest64` bytes make in ``byteorder`` (``bits=63`` fits a signed int64, e.g. a torch seed)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be between 1 and 64, got {bits}")
    return int.from_bytes(digest64(*parts, algorithm=algorithm), byteorder) >> (64 - bits)


def derive_unit(*parts: object) -> float:
    """A number in ``[0, 1)`` from ``parts``: the top 53 bits (a double's mantissa) of the big-endian
    sha256 over ``2**53``: evenly spaced values, exact in a float, never 1.0."""
    return derive_int(*parts, bits=53) / float(1 << 53)
