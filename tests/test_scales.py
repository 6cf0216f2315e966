import numpy as np
import pytest

from var_jax import scales


@pytest.mark.parametrize("name,seq_len,last", [("256", 680, 16), ("512", 2240, 32),
                                               ("1024", 9451, 64)])
def test_official_schedules(name, seq_len, last):
    layout = scales.token_layout(scales.SCHEDULES[name])
    assert layout.seq_len == seq_len
    assert layout.patch_nums[-1] == last
    assert layout.begin_ends[0] == (0, 1)
    assert layout.begin_ends[-1][1] == seq_len
    assert layout.level_ids.shape == (seq_len,)
    assert np.all(np.diff(layout.level_ids) >= 0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 17, 32, 64, 100, 128, 256])
def test_geometric_schedule_increasing_from_1_to_n(n):
    sched = scales.geometric_schedule(n)
    assert sched[0] == 1 and sched[-1] == n
    assert all(b > a for a, b in zip(sched, sched[1:], strict=False))
    seq_len = scales.token_layout(sched).seq_len
    assert n * n <= seq_len <= 3 * n * n


def test_geometric_schedule_token_counts():
    counts = {n: scales.token_layout(scales.geometric_schedule(n)).seq_len
              for n in (8, 16, 32, 64, 128, 256)}
    assert counts == {8: 130, 16: 680, 32: 2240, 64: 9676, 128: 39404, 256: 159889}


def test_block_causal_mask_matches_official_rule():
    layout = scales.token_layout((1, 2, 3))
    mask = layout.block_causal_mask()
    d = layout.level_ids
    np.testing.assert_array_equal(mask, d[:, None] >= d[None, :])
    assert mask[0].sum() == 1 and mask[-1].all()
    assert mask[1:5, 1:5].all() and not mask[1:5, 5:].any()


def test_phi_index_map_official_and_rule():
    assert scales.phi_index_map(10) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert scales.phi_index_map(14) == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)
    assert scales.phi_index_map(6) == (0, 0, 1, 2, 3, 3)
    assert scales.phi_index_map(3, num_phi=1) == (0, 0, 0)


@pytest.mark.parametrize("bad", [(), (0, 1), (1, 3, 2), (1, 1), "ab"])
def test_bad_schedules_raise(bad):
    with pytest.raises(ValueError, match="patch_nums"):
        scales.token_layout(bad)


def test_geometric_schedule_bad_n():
    with pytest.raises(ValueError, match="n must be"):
        scales.geometric_schedule(0)


def test_sampling_buckets_pad_within_the_budget():
    layout = scales.token_layout(scales.SCHEDULES["256"])
    plan = scales.sampling_buckets(layout.patch_nums)
    assert [b.scales for b in plan] == [(0, 1, 2, 3, 4, 5), (6, 7), (8,), (9,)]
    assert [(b.side, b.rows, b.read_len) for b in plan] == [
        (6, 36, 91), (10, 100, 255), (13, 169, 424), (16, 256, 680)]
    for schedule in scales.SCHEDULES.values():
        for max_padding in (0.0, 0.1, 0.25, 1.0):
            plan = scales.sampling_buckets(schedule, max_padding)
            assert [k for b in plan for k in b.scales] == list(range(len(schedule)))
            padded = sum(b.rows - schedule[k] ** 2 for b in plan for k in b.scales)
            assert padded <= max_padding * scales.token_layout(schedule).seq_len
            for b in plan:  # the bucket's largest map sets its shape and the keys it reads
                assert b.side == schedule[b.scales[-1]]
                assert b.read_len == scales.token_layout(schedule).begin_ends[b.scales[-1]][1]
    assert all(len(b.scales) == 1 for b in scales.sampling_buckets(layout.patch_nums, 0))
    with pytest.raises(ValueError, match="max_padding"):
        scales.sampling_buckets(layout.patch_nums, -0.1)


def test_leading_group_end():
    ends = scales.token_layout((1, 2, 3, 4)).begin_ends  # scales end at 1, 5, 14, 30
    assert [scales.leading_group_end(ends, g) for g in (0, 1, 4, 5, 13, 14, 29, 30, 1000)] == [
        0, 1, 1, 5, 5, 14, 14, 30, 30]
    assert [scales.leading_group_end(ends, g, include_first=True) for g in (0, 4, 14)] == [
        1, 1, 14]
