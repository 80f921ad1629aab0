"""Replay window: RFC 6479 bitmap with wireguard-go's window and counter limit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan_dp.replay import REJECT_AFTER_MESSAGES, WINDOW_SIZE, ReplayWindow
from tests.kubespan_dp.replaymodel import ReplayModel


def test_constants() -> None:
    assert WINDOW_SIZE == 8128
    assert REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1


def test_in_order_accepted_once() -> None:
    w = ReplayWindow()
    for n in range(3 * 8192):
        assert w.check(n)
        assert w.update(n)
        assert not w.check(n)
        assert not w.update(n)
    assert w.last == 3 * 8192 - 1


def test_first_counter_zero_then_duplicate() -> None:
    w = ReplayWindow()
    assert w.update(0)
    assert not w.update(0)
    assert w.update(1)
    assert not w.update(0)


def test_out_of_order_within_window() -> None:
    w = ReplayWindow()
    assert w.update(100)
    for n in (99, 3, 0, 50, 1, 2):
        assert w.check(n)
        assert w.update(n)
    for n in (99, 3, 0, 50, 1, 2, 100):
        assert not w.update(n)
    assert w.update(101)
    assert w.update(4)


def test_window_edge() -> None:
    w = ReplayWindow()
    top = 20_000
    assert w.update(top)
    # Exactly WINDOW_SIZE behind the newest counter is still inside.
    assert w.check(top - WINDOW_SIZE)
    assert w.update(top - WINDOW_SIZE)
    assert not w.update(top - WINDOW_SIZE)
    # One further back is too old, even though it was never seen.
    assert not w.check(top - WINDOW_SIZE - 1)
    assert not w.update(top - WINDOW_SIZE - 1)


def test_window_edge_for_every_bit_offset() -> None:
    # The edge is WINDOW_SIZE whatever the newest counter's position in its block.
    for offset in range(64):
        w = ReplayWindow()
        top = 64 * 200 + offset
        assert w.update(top)
        assert w.update(top - WINDOW_SIZE)
        assert not w.update(top - WINDOW_SIZE - 1)


def test_too_old_after_big_jump() -> None:
    w = ReplayWindow()
    for n in range(10):
        assert w.update(n)
    assert w.update(10 + WINDOW_SIZE + 1)
    for n in range(11):
        assert not w.update(n)
    assert w.update(11 + 1)  # inside the window and unseen


def test_jump_far_beyond_the_ring_clears_everything() -> None:
    w = ReplayWindow()
    for n in range(0, 8192, 3):
        assert w.update(n)
    far = 10**9
    assert w.update(far)
    # Every slot in the window behind the new top is clear again.
    for n in range(far - WINDOW_SIZE, far):
        assert w.check(n)
    assert not w.check(far)


def test_stale_ring_bits_do_not_leak_into_new_window() -> None:
    # Counters in the same ring slot one lap (8192) apart must not collide.
    w = ReplayWindow()
    assert w.update(5)
    assert w.update(5 + 8192)
    assert not w.update(5 + 8192)
    assert w.update(6 + 8192)
    assert w.update(5 + 2 * 8192)


def test_check_does_not_change_state() -> None:
    w = ReplayWindow()
    assert w.update(50)
    assert w.check(10_000)
    assert w.last == 50
    assert w.update(49)  # still inside the window: check(10_000) moved nothing


def test_counter_limit() -> None:
    w = ReplayWindow()
    assert not w.check(REJECT_AFTER_MESSAGES)
    assert not w.update(REJECT_AFTER_MESSAGES)
    assert not w.update(2**64 - 1)
    assert w.last == 0
    assert w.check(REJECT_AFTER_MESSAGES - 1)
    assert w.update(REJECT_AFTER_MESSAGES - 1)
    assert not w.update(REJECT_AFTER_MESSAGES - 1)
    assert w.update(REJECT_AFTER_MESSAGES - 1 - WINDOW_SIZE)
    assert not w.update(REJECT_AFTER_MESSAGES - 2 - WINDOW_SIZE)


def test_custom_limit_and_negative() -> None:
    w = ReplayWindow(limit=10)
    assert w.update(9)
    assert not w.update(10)
    assert not w.check(-1)
    assert not w.update(-1)


def test_reset() -> None:
    w = ReplayWindow()
    for n in range(0, 9000, 7):
        w.update(n)
    w.reset()
    assert w.last == 0
    for n in range(0, 9000, 7):
        assert w.update(n)


# Steps relative to the newest counter, biased towards the window edges.
_steps = st.one_of(
    st.integers(-WINDOW_SIZE - 70, 70),
    st.integers(-20_000, 20_000),
    st.sampled_from([-WINDOW_SIZE - 1, -WINDOW_SIZE, -WINDOW_SIZE + 1, 0, 1, 8192, 64]),
)


@settings(max_examples=300)
@given(
    st.lists(_steps, max_size=200),
    st.sampled_from([0, 9000, 10**12, REJECT_AFTER_MESSAGES - 15_000]),
)
def test_matches_naive_model(steps: list[int], start: int) -> None:
    w, model = ReplayWindow(), ReplayModel()
    for step in steps:
        n = max(0, min(2**64, (model.last or start) + step))
        assert w.check(n) == model.check(n), n
        assert w.update(n) == model.update(n), n
        assert w.last == model.last
