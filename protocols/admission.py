"""Who may contribute to a swarm: the manifest's admission rule, and creator-signed tokens.

In an ``open`` swarm anyone may contribute. In an ``allowlist`` swarm a peer's key must be
the creator's, be in the manifest's allowlist, or come with an admission token: the
creator's signature on "key K may contribute to swarm S (until T)". Tokens let a creator
admit people after the manifest is fixed, since changing the allowlist would change the
swarm id. There is no revocation; give tokens an expiry if that matters.

Token (msgpack, at most ``MAX_TOKEN`` bytes)::

    [version = 1, swarm id: str, member: bin 32, expires: int (unix seconds; 0 never),
     signature: bin 64]

The signature covers ``TOKEN_TAG ‖ msgpack([swarm id, member, expires])``; the domain tag
keeps it from passing as a manifest or message signature. Time comes in as ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from byteswarm.optim.sansio import Rejected
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .manifest import Manifest
from .signing import SIG_BYTES, check_key, pack, sign_bytes, verify_bytes
from .swarmid import ID_CHARS

VERSION = 1
TOKEN_TAG = b"byteswarm/admission/v1\0"
MAX_TOKEN = 256
MAX_EXPIRES = 1 << 62


@dataclass(frozen=True)
class Token:
    swarm: str
    member: bytes  # raw Ed25519 public key admitted
    expires: int  # unix seconds; 0: never
    signature: bytes  # by the swarm's creator

    def payload(self) -> bytes:
        return pack([self.swarm, self.member, self.expires])


def make_token(creator_key: Ed25519PrivateKey, *, swarm_id: str, member: bytes,
               expires: int = 0) -> bytes:
    """Token bytes admitting ``member`` (a raw public key) to ``swarm_id``."""
    if len(member) != 32 or not 0 <= expires <= MAX_EXPIRES:
        raise ValueError("make_token: member must be a 32-byte key, expires in [0, 2^62]")
    t = Token(swarm_id, bytes(member), expires, b"")
    sig = sign_bytes(creator_key, TOKEN_TAG, t.payload())
    return pack([VERSION, swarm_id, t.member, expires, sig])


def decode_token(data: Any) -> Token:
    """Token bytes to a Token (size and shape checked, not the signature), or Rejected."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Rejected("malformed", "not bytes")
    if len(data) > MAX_TOKEN:
        raise Rejected("oversized", f"{len(data)} > {MAX_TOKEN} bytes")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True,
                              max_str_len=ID_CHARS, max_bin_len=SIG_BYTES, max_array_len=5,
                              max_map_len=0, max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError, UnicodeDecodeError) as e:
        raise Rejected("malformed", type(e).__name__) from None
    if not (isinstance(obj, list) and len(obj) == 5):
        raise Rejected("malformed", "not a 5-element admission token")
    version, swarm, member, expires, signature = obj
    if type(version) is not int or version != VERSION:
        raise Rejected("bad_version", repr(version)[:40])
    if not isinstance(swarm, str):
        raise Rejected("bad_field", "swarm id is not a string")
    if type(expires) is not int or not 0 <= expires <= MAX_EXPIRES:
        raise Rejected("bad_field", f"expires={expires!r}"[:80])
    if not isinstance(signature, bytes) or len(signature) != SIG_BYTES:
        raise Rejected("bad_field", f"signature is not {SIG_BYTES} bytes")
    return Token(swarm, check_key(member, "member"), expires, signature)


def verify_token(data: Any, *, swarm_id: str, creator: bytes, now: float) -> bytes:
    """The admitted member's key, if the token is for ``swarm_id``, signed by ``creator``
    and not expired at ``now``; else Rejected (``wrong_swarm``, ``bad_signature``,
    ``expired``)."""
    t = decode_token(data)
    if t.swarm != swarm_id:
        raise Rejected("wrong_swarm", f"a token for {t.swarm}")
    if not verify_bytes(creator, TOKEN_TAG, t.payload(), t.signature):
        raise Rejected("bad_signature", "the token is not signed by the swarm's creator")
    if t.expires and now >= t.expires:
        raise Rejected("expired", f"the token expired at {t.expires}")
    return t.member


def check_admission(m: Manifest, member: bytes, *, now: float, token: bytes | None = None,
                    swarm_id: str | None = None) -> None:
    """Raise Rejected (``not_admitted`` or the token's reason) unless ``member`` (a raw
    public key) may contribute. ``swarm_id``: pass it to skip recomputing the hash."""
    if m.admission == "open" or member == m.creator or member in m.allowlist:
        return
    if token is None:
        raise Rejected("not_admitted", "the swarm admits only its allowlist and token "
                       "holders")
    sid = swarm_id if swarm_id is not None else m.swarm_id
    if verify_token(token, swarm_id=sid, creator=m.creator, now=now) != member:
        raise Rejected("not_admitted", "the token admits another key")

