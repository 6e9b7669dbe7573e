"""The record of inbox positions a socket was sent (channels_app/positions.py); clarion.js keeps
the same one, which the browser tests exercise."""

from __future__ import annotations

from channels_app.positions import SeenPositions


def test_in_order_positions_move_the_mark() -> None:
    seen = SeenPositions()
    assert [seen.add(p) for p in (1, 2, 3)] == [True, True, True]
    assert (seen.mark, seen.above) == (3, set())


def test_an_early_position_waits_above_the_gap_until_it_fills() -> None:
    seen = SeenPositions(mark=4)
    assert seen.add(6) is True
    assert (seen.mark, seen.above) == (4, {6})
    assert seen.add(6) is False
    assert seen.add(4) is False
    assert seen.add(5) is True
    assert (seen.mark, seen.above) == (6, set())


def test_a_catch_up_advances_over_gaps_and_keeps_what_is_beyond() -> None:
    seen = SeenPositions()
    for position in (2, 5, 9):
        seen.add(position)
    seen.advance(5)
    assert (seen.mark, seen.above) == (5, {9})
    seen.advance(3)  # never backwards
    assert seen.mark == 5
    seen.advance(8)
    assert (seen.mark, seen.above) == (9, set())


def test_a_gap_that_never_fills_is_closed_over_past_the_limit() -> None:
    seen = SeenPositions(limit=3)
    for position in (3, 4, 5):
        seen.add(position)
    assert seen.mark == 0
    seen.add(7)
    # Four above a gap at 1-2: the gap is given up, and 6 is still awaited.
    assert (seen.mark, seen.above) == (5, {7})
    assert seen.add(1) is False
    assert seen.add(6) is True
    assert seen.mark == 7
