import pytest

import graphrunner as gr
from graphrunner._native import _C
from graphrunner.schedule import capture_order, checked_capture_sizes


def test_default_sizes_match_serving_engines():
    sizes = gr.default_capture_sizes(256)
    assert sizes[:8] == [1, 2, 4, 8, 12, 16, 24, 32]
    assert sizes[8:] == list(range(40, 257, 8))
    assert len(sizes) == 36


@pytest.mark.parametrize("max_bs", [1, 3, 33, 100, 256, 300, 1000])
def test_default_sizes_end_at_max_and_ascend(max_bs):
    sizes = gr.default_capture_sizes(max_bs)
    assert sizes[-1] == max_bs
    assert sizes == sorted(set(sizes))
    assert all(1 <= s <= max_bs for s in sizes)


def test_coarser_beyond_256():
    sizes = gr.default_capture_sizes(1024)
    assert [b - a for a, b in zip(sizes, sizes[1:]) if a >= 256][:3] == [16, 16, 16]
    assert sizes[-2] - sizes[-3] == 32


def test_capture_order_is_largest_first():
    assert capture_order([4, 1, 16, 8]) == [16, 8, 4, 1]


@pytest.mark.parametrize("batch,want", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 12), (17, 24), (200, 200),
                                        (201, 208), (256, 256), (257, None)])
def test_size_for_picks_smallest_fit(batch, want):
    assert _C.SizeTable(gr.default_capture_sizes(256), 256).size_for(batch) == (want or 0)


def test_checked_capture_sizes_sorts_and_rejects():
    assert checked_capture_sizes([8, 1, 8, 4], 8) == [1, 4, 8]
    with pytest.raises(ValueError, match="capture_sizes must be ints in 1..max_batch_size"):
        checked_capture_sizes([0, 4], 8)
    with pytest.raises(ValueError, match="capture_sizes is empty"):
        checked_capture_sizes([], 8)
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        gr.default_capture_sizes(0)
