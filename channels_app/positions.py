"""Which inbox positions a socket has been sent (DESIGN.md: `since`). Positions are dense per
recipient (notifications.models.InboxCounter) but may arrive out of order (two processes push
for one recipient at once; a delivery held by the rate limiter goes out later than the next
one), so "seen" is every position up to `mark` plus the few above it that came early.
`mark` is what a reconnect resumes from: nothing at or below it is missing. clarion.js keeps
the same record on the browser's side."""

from __future__ import annotations


class SeenPositions:
    def __init__(self, *, mark: int = 0, limit: int = 5000):
        self.mark = mark
        self.above: set[int] = set()
        # Positions above a gap kept at most: a gap that never fills (its delivery went dead
        # and was never pushed) is closed over when there are more.
        self.limit = limit

    def add(self, position: int) -> bool:
        """Record a position; False when it was seen already."""
        if position <= self.mark or position in self.above:
            return False
        self.above.add(position)
        if len(self.above) > self.limit:
            self.mark = min(self.above) - 1
        self._close_up()
        return True

    def advance(self, position: int) -> None:
        """Everything up to `position` has been seen (the end of a catch-up)."""
        if position > self.mark:
            self.mark = position
            self.above = {p for p in self.above if p > position}
            self._close_up()

    def _close_up(self) -> None:
        while self.mark + 1 in self.above:
            self.mark += 1
            self.above.remove(self.mark)
