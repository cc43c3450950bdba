"""BatchKVCache bookkeeping: right-aligned rows addressed by key, cheap join/leave, one buffer for its whole life,
and its size from a memory budget."""
import pytest
import torch

from baton.engine.cache import BatchKVCache, kv_capacity, step_slack


def _kv(P, fill, L=2, H=2, D=4):
    return torch.full((L, 2, H, P, D), float(fill), dtype=torch.float64)


def _join(c, key, P, fill):
    c.join(key, f"req-{key}", _kv(P, fill))


def _step(c):
    step = c.begin_step()
    for layer in range(c.buf.shape[0]):
        k, v = c.layer_views(layer)
        k[:, :, step.col] = 100.0
        v[:, :, step.col] = 100.0
    c.end_step()


def _cache(rows=4, cols=16):
    return BatchKVCache(2, 2, 4, dtype=torch.float64, max_rows=rows, max_cols=cols)


def test_rows_are_right_aligned_and_masked():
    c = _cache()
    _join(c, "a", 3, 1)
    _join(c, "b", 5, 2)                        # longer: widens
    assert c.width == 5 and c.lens == [3, 5] and c.occupants == ["req-a", "req-b"]
    step = c.begin_step()
    assert step.positions.tolist() == [3, 5] and step.col == 5
    visible = step.mask[:, 0, 0] == 0          # (n, width + 1); -inf elsewhere
    assert visible.tolist() == [[False, False, True, True, True, True], [True] * 6]
    assert torch.equal(c.row_kv("a"), _kv(3, 1)) and torch.equal(c.row_kv("b"), _kv(5, 2))


def test_leave_moves_last_row_and_trims():
    c = _cache()
    for key, P, fill in [("a", 2, 1), ("b", 9, 2), ("c", 4, 3)]:
        _join(c, key, P, fill)
    _step(c)
    assert c.leave("b") == "req-b"              # the longest row leaves; the last one moves into its row
    assert c.occupants == ["req-a", "req-c"] and c.get("c") == "req-c" and "b" not in c
    assert c.lens == [3, 5] and c.width == 5   # trimmed from 10 to 5 columns, no copy of other rows
    assert c.begin_step().positions.tolist() == [3, 5]
    assert torch.equal(c.row_kv("c")[..., :4, :], _kv(4, 3))
    assert c.leave("b") is None                # not in the batch (any more): nothing moves
    assert c.leave("c") == "req-c" and c.lens == [3]
    with pytest.raises(ValueError, match="already holds a row"):
        _join(c, "a", 2, 1)


def test_the_buffer_is_never_reallocated_and_compaction_keeps_every_row():
    """500 steps with rows leaving and joining in a 40-column cache: the window is moved back to
    column 0 many times, in the same buffer, and every row keeps its own K/V."""
    c = _cache(rows=4, cols=40)
    address = c.buf.data_ptr()
    fills = {}
    for i in range(4):
        _join(c, i, 1 + i, i)
        fills[i] = (i, 1 + i)                 # key -> (fill, prompt length)
    for s in range(500):
        _step(c)
        longest = max(c.rows, key=lambda r: r.length)
        if longest.length >= 30:              # it leaves; a newcomer takes a row
            c.leave(longest.key)
            fills.pop(longest.key)
            key = f"n{s}"
            _join(c, key, 3, 50 + s)
            fills[key] = (50 + s, 3)
    assert c.buf.data_ptr() == address and c.compactions >= 10
    for key, (fill, P) in fills.items():
        kv = c.row_kv(key)
        assert torch.equal(kv[..., :P, :], _kv(P, fill)) and bool((kv[..., P:, :] == 100.0).all())
    assert c.begin_step().positions.tolist() == c.lens


def test_an_empty_batch_starts_again_with_room_for_longer_newcomers():
    c = _cache(cols=64)
    _join(c, "a", 10, 1)
    for _ in range(20):
        _step(c)
    c.leave("a")
    assert (c.start, c.end) == (0, 0)
    _join(c, "b", 12, 1)
    assert (c.start, c.end) == (12, 24)       # room left of the row for one up to twice as long
    _join(c, "c", 24, 2)
    assert c.moves == 0 and c.width == 24 and c.lens == [12, 24]


def test_reserve_moves_the_window_once_for_a_group_of_newcomers():
    c = _cache(rows=8, cols=64)
    _join(c, "a", 4, 1)
    _step(c)
    c.reserve(4, 30)                          # one move: to the first half's end, room for rows up to 32 tokens
    assert (c.moves, c.end) == (1, 32) and torch.equal(c.row_kv("a")[..., :5, :], torch.cat((_kv(4, 1), _kv(1, 100)), 3))
    for i, P in enumerate([30, 7, 12, 32]):
        _join(c, i, P, 10 + i)
    assert (c.moves, c.end) == (1, 32) and c.lens == [5, 30, 7, 12, 32]
    _join(c, "long", 40, 5)                   # longer than the room: one more move, every row kept
    assert (c.moves, c.end) == (2, 40) and c.lens == [5, 30, 7, 12, 32, 40]
    assert torch.equal(c.row_kv(1)[..., :7, :], _kv(7, 11)) and torch.equal(c.row_kv("long"), _kv(40, 5))
    with pytest.raises(ValueError, match="does not fit"):
        c.reserve(7, 64)                      # a row must leave a column to step into


def test_capacity_comes_from_the_budget_and_caps_the_context():
    per_token = 1000
    full = kv_capacity(4, per_token, 1024, budget=1 << 30)       # plenty: the model's whole context
    assert full.max_len == 1024 and full.cols == 1024 + step_slack(1024)
    small = kv_capacity(4, per_token, 1024, budget=4 * 600 * per_token)
    assert small.cols == 600 and small.max_len == 600 - step_slack(600) and small.nbytes <= 4 * 600 * per_token
    assert kv_capacity(4, per_token, 1024, max_model_len=256).max_len == 256
    with pytest.raises(ValueError, match="--max-model-len or --max-num-seqs"):
        kv_capacity(4, per_token, 1024, max_model_len=1000, budget=4 * 600 * per_token)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        kv_capacity(4, per_token, 1024, max_model_len=2048)
