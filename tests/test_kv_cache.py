"""BatchKVCache bookkeeping: right-aligned rows, cheap insert/remove, amortised growth."""
import torch

from baton.kv_cache import BatchKVCache


def _kv(P, fill, L=2, H=2, D=4):
    return torch.full((L, 2, H, P, D), float(fill), dtype=torch.float64)


def _step(c):
    col = c.append_column()
    for layer in range(c.buf.shape[0]):
        k, v = c.layer_views(layer)
        k[:, :, col - c.start] = 100.0
        v[:, :, col - c.start] = 100.0
    c.commit_step()


def test_rows_are_right_aligned_and_masked():
    c = BatchKVCache(2, 2, 4, dtype=torch.float64, max_rows=4, col_chunk=8)
    assert c.insert(_kv(3, 1)) == 0
    assert c.insert(_kv(5, 2)) == 1           # longer: widens
    assert c.width == 5 and c.lens == [3, 5]
    assert c.positions().tolist() == [3, 5]
    visible = c.attention_mask()[:, 0, 0] == 0  # (n, width + 1); -inf elsewhere
    assert visible.tolist() == [[False, False, True, True, True, True], [True] * 6]
    assert torch.equal(c.row_kv(0), _kv(3, 1)) and torch.equal(c.row_kv(1), _kv(5, 2))


def test_remove_moves_last_row_and_trims():
    c = BatchKVCache(2, 2, 4, dtype=torch.float64, max_rows=4, col_chunk=8)
    for P, fill in [(2, 1), (9, 2), (4, 3)]:
        c.insert(_kv(P, fill))
    _step(c)
    assert c.remove(1) == 2                   # the longest row leaves; the last one moves into row 1
    assert c.lens == [3, 5] and c.width == 5  # trimmed from 10 to 5 columns, no copy of other rows
    assert torch.equal(c.row_kv(1)[..., :4, :], _kv(4, 3))
    assert c.remove(1) is None and c.lens == [3]


def test_growth_is_amortised():
    c = BatchKVCache(2, 2, 4, dtype=torch.float64, max_rows=8, col_chunk=8)
    for i in range(8):
        c.insert(_kv(1 + i, i))
    before = c.relayouts
    for _ in range(500):
        _step(c)
    assert c.relayouts - before <= 8          # geometric growth: a handful of reallocations in 500 steps
    assert [c.row_kv(r)[0, 0, 0, 0, 0].item() for r in range(8)] == [float(i) for i in range(8)]


def test_empty_batch_reuses_its_buffer():
    c = BatchKVCache(2, 2, 4, dtype=torch.float64, max_rows=2, col_chunk=64)
    c.insert(_kv(10, 1))
    c.remove(0)
    before = c.relayouts
    c.insert(_kv(20, 1))
    assert c.relayouts == before and c.width == 20


def test_reserve_makes_room_for_a_group_in_one_reallocation():
    c = BatchKVCache(2, 2, 4, dtype=torch.float64, max_rows=8, col_chunk=4)
    lens = [3, 9, 5, 12, 1, 7]
    c.reserve(len(lens), max(lens))
    before = c.relayouts
    for i, P in enumerate(lens):
        c.insert(_kv(P, i + 1))
    assert c.relayouts == before and c.lens == lens
    assert all(torch.equal(c.row_kv(i), _kv(P, i + 1)) for i, P in enumerate(lens))
    _step(c)
    c.reserve(8, 20)                          # a non-empty batch: one relayout keeps every row
    assert c.relayouts == before + 1
    for i, P in enumerate([20, 2]):
        c.insert(_kv(P, 10 + i))
    assert c.relayouts == before + 1 and c.lens == [P + 1 for P in lens] + [20, 2]
    assert all(torch.equal(c.row_kv(i)[..., :P, :], _kv(P, i + 1)) for i, P in enumerate(lens))
    assert torch.equal(c.row_kv(6), _kv(20, 10)) and torch.equal(c.row_kv(7), _kv(2, 11))

