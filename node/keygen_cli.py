"""``byteswarm keygen --out PATH``: make a new identity key and print who it is.

The file is the node's own identity format (node/identity.py: libp2p's Ed25519 private
key protobuf, mode 0600), so it can be given to ``byteswarm node --identity PATH``. The
two printed lines are what others need: the peer id, and the public key in hex, which is
what a swarm manifest's ``creator`` and ``allowlist`` hold. An existing file is never
overwritten: losing a key means losing the identity.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from byteswarm.optim.config import ConfigError

from .identity import create_identity, load_identity, peer_id_of, public_key_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="create an Ed25519 identity key file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="PATH",
                   help="where to write the key (mode 0600; must not exist)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.out).expanduser()
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} already exists; refusing to overwrite a key")
    try:
        create_identity(path)
    except FileExistsError:  # created between the check and the open: still refuse
        raise ConfigError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None
    pub = public_key_bytes(load_identity(path))
    print(f"wrote {path} (mode 0600)")
    print(f"peer id:    {peer_id_of(pub)}")
    print(f"public key: {pub.hex()}")
    return 0
