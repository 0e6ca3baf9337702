"""The broker's clock for its peers' silence: the time it spent able to hear them.

The rule (docs/protocol.md, "Liveness"): the broker never declares a peer dead for time it did not itself spend
listening. What a peer sends while the broker is busy with a batch waits in ZeroMQ's queue and is read at the next
turn of the loop, so a peer's silence is judged at the moment the broker began reading (the start of the turn), never
after a batch whose commit may have taken seconds. And one turn counts for at most :attr:`ListeningClock.max_turn`
seconds, however long it took by the monotonic clock: a longer turn is a stall of the broker (a slow commit, SIGSTOP,
a suspended machine, the monotonic clock stepping), and during a stall every peer gets its silence counted from
afresh; what it sent meanwhile is read in the next turn. Wall-clock time is never used for liveness.

A dead peer is still found: its silence grows with every turn of listening, up to ``peer_timeout``. A broker that
stalls again and again finds it later, never earlier.
"""

from __future__ import annotations

import time

__all__ = ('ListeningClock',)


class ListeningClock:
    """Seconds of listening, advanced once per turn of the loop (:meth:`turn`); read with :attr:`now`."""

    def __init__(self, heartbeat: float, peer_timeout: float) -> None:
        # A normal turn is one poll (at most 0.1 s) and one batch; one heartbeat interval, and a quarter of the peer
        # timeout, bound it with room, so that a live peer's silence stays well below the timeout across a stall.
        self.max_turn = max(0.1, min(heartbeat, peer_timeout / 4))
        self._real = time.monotonic()
        self.now = self._real

    def turn(self) -> float:
        """The loop is about to read what its sockets have: count the time since the last turn, up to ``max_turn``."""
        real = time.monotonic()
        self.now += min(max(0.0, real - self._real), self.max_turn)
        self._real = real
        return self.now
