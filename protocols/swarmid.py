"""Swarm ids: ``bs1`` + bech32m of a 20-byte hash, short enough to type and hard to mistype.

A swarm id names a manifest (protocols/manifest.py): it is the first 160 bits of sha256
of the manifest's canonical bytes, written in bech32m (BIP-350, the encoding of Bitcoin's
taproot addresses) with human-readable part ``bs``. That gives 41 lowercase characters,
e.g. ``bs1qd9p3…``, from an alphabet with no 1, b, i or o, whose 6-character checksum
detects every error in up to four characters. So ``parse_swarm_id`` can tell a user "a
character is mistyped" at once, instead of a join that finds no manifest. (Plain base32 of
the hash would work as a name, but a typo would only show up as a failed fetch.)

160 bits: a second manifest with the same id needs ~2^80 tries by the birthday bound,
and hitting a given swarm's id needs ~2^160.
"""

from __future__ import annotations

import hashlib

from byteswarm.optim.config import ConfigError

BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
BECH32M_CONST = 0x2BC830A3
HRP = "bs"
ID_BYTES = 20
ID_CHARS = len(HRP) + 1 + ID_BYTES * 8 // 5 + 6  # "bs" "1" 32 data, 6 checksum: 41


def _polymod(values: list[int]) -> int:
    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def bech32m_encode(hrp: str, data: list[int]) -> str:
    """BIP-350 encoding of 5-bit groups ``data`` under the human-readable part ``hrp``."""
    pm = _polymod(_hrp_expand(hrp) + data + [0] * 6) ^ BECH32M_CONST
    check = [(pm >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(BECH32[v] for v in data + check)


def bech32m_valid(text: str) -> bool:
    """Whether lowercase ``text`` is valid bech32m (separator, alphabet, checksum)."""
    hrp, _, rest = text.rpartition("1")
    if not hrp or len(rest) < 6 or any(c not in BECH32 for c in rest):
        return False
    return _polymod(_hrp_expand(hrp) + [BECH32.index(c) for c in rest]) == BECH32M_CONST


def of_bytes(canonical: bytes) -> str:
    """The swarm id of a manifest's canonical bytes."""
    n = int.from_bytes(hashlib.sha256(canonical).digest()[:ID_BYTES], "big")
    groups = ID_BYTES * 8 // 5
    return bech32m_encode(HRP, [(n >> 5 * (groups - 1 - i)) & 31 for i in range(groups)])


def parse_swarm_id(text: str) -> str:
    """A swarm id as a user typed it, normalised to lowercase, or ConfigError saying what
    is wrong with it."""
    s = text.strip()
    if s != s.lower() and s != s.upper():
        raise ConfigError(f"swarm id {text!r}: mixes upper and lower case")
    s = s.lower()
    if not s.startswith(HRP + "1"):
        raise ConfigError(f"swarm id {text!r}: must start with 'bs1'")
    if len(s) != ID_CHARS:
        raise ConfigError(f"swarm id {text!r}: has {len(s)} characters, expected {ID_CHARS}")
    odd = sorted({c for c in s[3:] if c not in BECH32})
    if odd:
        raise ConfigError(f"swarm id {text!r}: {odd[0]!r} never appears in a swarm id "
                          "(no 1, b, i or o after 'bs1')")
    if not bech32m_valid(s):
        raise ConfigError(f"swarm id {text!r}: checksum fails; a character is mistyped")
    return s
