"""Who may do what on a node: take part (admission), ask for our state, author a record we
take from a donor's log. Answers only from what was verified: a member's signed heartbeat
(node/transport.py) and the swarm's admission rule (protocols/admission.py)."""

from __future__ import annotations

from collections.abc import Callable

MAX_VERDICTS = 10_000  # cached admission verdicts, then the cache starts over


class Gate:
    """``admit(peer, token)``: a public swarm's admission rule; None: everyone may take
    part. Verdicts are cached per (peer, token)."""

    def __init__(self, me: str, admit: Callable[[str, bytes | None], bool] | None = None):
        self.me, self.admit = me, admit
        self.verdicts: dict[tuple[str, bytes | None], bool] = {}

    def admitted(self, peer: str, token: bytes | None) -> bool:
        if self.admit is None or peer == self.me:
            return True
        if (peer, token) not in self.verdicts:
            if len(self.verdicts) > MAX_VERDICTS:
                self.verdicts.clear()
            self.verdicts[peer, token] = self.admit(peer, token)
        return self.verdicts[peer, token]

    def may_author(self, peer: str, token: bytes | None, banned: set[str]) -> bool:
        """May a record of ``peer`` come to us in a donor's sealed log? Not if it is banned,
        nor if the swarm admits by rule and ``peer`` never passed it while we watched (an
        author who left before we came cannot be checked: its records are left out, and a
        replica that splits for it resyncs like any other)."""
        if peer in banned:
            return False
        return (self.admitted(peer, token)
                or any(ok for (p, _), ok in self.verdicts.items() if p == peer))
