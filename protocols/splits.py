"""Finding a split SPSA replica: our fingerprints against the ones our peers publish.

A record that reaches some peers but not others before its step is final splits the
replicas for good. Every peer therefore publishes, with its signed heartbeat, the
fingerprints of θ at its latest final steps that are multiples of ``MARK_EVERY`` (and at
the snapshots it serves, so that a joiner finds several donors vouching for one). A peer
whose fingerprint at a step is outvoted by another one (``Marks.outvoted``) catches up
with the peers of the majority, as a joiner does. Two peers alone cannot tell who split;
they only see the disagreement.

A replica can also fall behind without splitting: a peer nobody waits for (banned, or
slower than the rest while their waits end without it) drifts further back than its
algorithm can follow (SPSA refuses records too far ahead, and its own reach the others after
their steps are final). ``left_behind`` tells it to catch up the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

KEPT = 32  # our own marks kept for comparison
PUBLISHED = 8  # our latest marks in each heartbeat


class Marks:
    """Our own marks (final step -> fingerprint), and the verdicts drawn from them."""

    def __init__(self) -> None:
        self.own: dict[int, str] = {}

    def add(self, mark: tuple[int, str] | None) -> None:
        if mark is not None and mark[0] not in self.own:
            self.own[mark[0]] = mark[1]
            for old in sorted(self.own)[:-KEPT]:
                del self.own[old]

    def clear(self) -> None:
        """Forget them (they were of a replica we replaced)."""
        self.own = {}

    def published(self, served: Iterable[int]) -> dict[int, str]:
        """What our heartbeat carries: the latest few (heartbeats of different peers come
        at different steps, so one mark each would rarely meet), and those of the states
        we serve."""
        steps = sorted(self.own)[-PUBLISHED:] + sorted(served)
        return {t: self.own[t] for t in sorted(set(steps)) if t in self.own}

    def outvoted(self, others: dict[str, dict[int, str]], me: str) -> list[str]:
        """Peers whose replica we should copy. The latest step that we and others marked
        and where one fingerprint has more votes than any other (we count as one) decides:
        if that fingerprint is not ours, the peers who published it. Steps with a tie, or
        that only we marked, are skipped; none decisive: empty. ``others`` are verified
        peers' published marks (one vote each, whatever they claim)."""
        for step in sorted(self.own, reverse=True):
            votes: dict[str, list[str]] = {self.own[step]: [me]}
            for peer, marks in others.items():
                if peer != me and step in marks:
                    votes.setdefault(marks[step], []).append(peer)
            ranked = sorted(map(len, votes.values()), reverse=True)
            if (len(ranked) > 1 and ranked[0] == ranked[1]) or ranked == [1]:
                continue
            best = max(votes.values(), key=len)
            return [] if me in best else best
        return []


def left_behind(progress: dict[str, int], me: str, banned: set[str],
                behind: Callable[[int], bool]) -> list[str]:
    """The members to catch up from, if most of the others (``progress``: verified members'
    published positions; banned ones left out) are further ahead than ``behind`` says we
    can follow; else empty. One vote per member: a few claiming to be far ahead move us
    to nothing."""
    others = [p for p in progress if p != me and p not in banned]
    ahead = [p for p in others if behind(progress[p])]
    return ahead if 2 * len(ahead) > len(others) else []
