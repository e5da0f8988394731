"""The node's identity: one Ed25519 key, used by libp2p and by the algorithms alike.

The key file is libp2p's own format (a ``crypto_pb2.PrivateKey`` protobuf with key type
Ed25519 and the 64-byte seed ‖ public key), so hivemind's p2pd loads it directly with
``identity_path``. The peer id the algorithms use is the libp2p peer id (``12D3KooW…``),
which for Ed25519 is the public key itself under an identity multihash. Every stream a
peer opens to us is authenticated by the libp2p handshake, so the sender id the driver
hands to ``on_message`` is proved by that key, not claimed in the message.

The file is created with mode 0600 on first use and refused later if others may read it,
as ssh refuses a private key with loose permissions.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from byteswarm.optim.config import ConfigError
from byteswarm.protocols.signing import public_key_of_peer
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

SEED_BYTES = 32


def _raw(key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    priv = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    pub = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return priv, pub


def peer_id_of(public_key: bytes) -> str:
    """libp2p peer id of an Ed25519 public key: identity multihash of its protobuf form."""
    pb = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=public_key)
    blob = pb.SerializeToString()  # 36 bytes: < 128, so the varint length is one byte
    return PeerID(bytes([0x00, len(blob)]) + blob).to_base58()


def public_key_of(peer_id: str) -> bytes:
    """The raw 32-byte Ed25519 key inside a libp2p peer id: the inverse of ``peer_id_of``.

    The peer id is base58btc of ``00 24 08 01 12 20`` + key (an identity multihash of
    the key's protobuf), so no lookup is needed. Raises ``Rejected("bad_peer_id")`` for
    anything else (junk, or a non-Ed25519 peer id such as an RSA one).
    """
    return public_key_of_peer(peer_id)


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return _raw(key)[1]


def create_identity(path: Path) -> None:
    """Write a new key to ``path`` (mode 0600); fails if the file already exists."""
    priv, pub = _raw(Ed25519PrivateKey.generate())
    pb = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=priv + pub)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pb.SerializeToString())
        os.fsync(fd)
    finally:
        os.close(fd)


def load_identity(path: Path) -> Ed25519PrivateKey:
    """Read and check a key file; a user-fixable problem raises ConfigError."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"identity: {path} is readable by others (mode "
                          f"{stat.S_IMODE(mode):o}); run chmod 600 {path}")
    try:
        pb = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    except Exception:  # protobuf raises its own DecodeError
        raise ConfigError(f"identity: {path} is not a libp2p private key file") from None
    if pb.key_type != crypto_pb2.KeyType.Ed25519 or len(pb.data) not in (64, 96):
        raise ConfigError(f"identity: {path} does not hold an Ed25519 key")
    key = Ed25519PrivateKey.from_private_bytes(pb.data[:SEED_BYTES])
    if _raw(key)[1] != pb.data[SEED_BYTES:2 * SEED_BYTES]:
        raise ConfigError(f"identity: {path} is corrupt (public key does not match)")
    return key


def ensure_identity(path: str | Path) -> tuple[Path, str]:
    """(path, peer id): load the key at ``path``, creating it on first use."""
    path = Path(path).expanduser()
    if not path.exists():
        create_identity(path)
    key = load_identity(path)
    return path, peer_id_of(_raw(key)[1])
