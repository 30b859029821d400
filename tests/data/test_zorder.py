"""Z-ordering of POIs (paper 4.1.1; key convention of docs/DATA-SEQUENCE.md, SEMANTICS.md 2.4)."""
import numpy as np

from refound_core.data.zorder import morton_keys, zorder_permutation


def _reference_key(col: int, row: int) -> int:
    """Bit-by-bit Morton key: column bit b -> 2b, row bit b -> 2b + 1."""
    return sum((((col >> b) & 1) << (2 * b)) | (((row >> b) & 1) << (2 * b + 1)) for b in range(32))


def test_worked_example_keys_and_order():
    # SEMANTICS.md 2.4: A (1,0) -> 1, B (12,1) -> 82, C (1,14) -> 169, so A, B, C
    assert morton_keys([1, 12, 1], [0, 1, 14]).tolist() == [1, 82, 169]
    local = np.array([[1.92, 14.4], [12.8, 1.6], [1.6, 0.8]])  # C, B, A in 1 m units of a 16 m region
    assert zorder_permutation(local, np.random.default_rng(0)).tolist() == [2, 1, 0]


def test_keys_match_bitwise_reference_including_large_values():
    rng = np.random.default_rng(0)
    cols = np.concatenate([rng.integers(0, 2**32, 200), [0, 2**32 - 1, 2**31]])
    rows = np.concatenate([rng.integers(0, 2**32, 200), [2**32 - 1, 0, 2**31]])
    keys = morton_keys(cols, rows)
    assert keys.dtype == np.uint64
    assert [int(k) for k in keys] == [_reference_key(int(c), int(r)) for c, r in zip(cols, rows)]
    assert int(morton_keys([2**32 - 1], [2**32 - 1])[0]) == 2**64 - 1


def test_four_by_four_is_the_z_pattern_with_row_zero_at_the_north():
    cells = [(c, r) for r in range(4) for c in range(4)]
    local = np.array(cells, dtype=float) + 0.5
    order = zorder_permutation(local, np.random.default_rng(0))
    visited = [cells[i] for i in order]
    # the "Z": west-east within the top row pair first, then down; quadrants NW, NE, SW, SE
    assert visited == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1),
                       (0, 2), (1, 2), (0, 3), (1, 3), (2, 2), (3, 2), (2, 3), (3, 3)]


def test_quadrants_are_contiguous_at_every_level():
    rng = np.random.default_rng(1)
    local = rng.uniform(0, 256, (3000, 2))
    seq = local[zorder_permutation(local, rng)]
    cells = np.floor(seq).astype(int)
    for level in (128, 64, 32):
        quad = (cells[:, 1] // level) * (256 // level) + cells[:, 0] // level
        # each quadrant id occupies one run of the sequence
        runs = np.concatenate([[True], quad[1:] != quad[:-1]])
        assert runs.sum() == len(np.unique(quad))
    top = (cells[:, 1] < 128) & (cells[:, 0] < 128)  # NW quadrant comes first
    assert top[: top.sum()].all()


def test_ties_in_one_unit_are_random_but_seeded():
    local = np.array([[5.2, 5.3], [5.7, 5.9], [0.5, 0.5], [200.0, 100.0]])  # 0 and 1 share the unit (5, 5)
    orders = {tuple(zorder_permutation(local, np.random.default_rng(s)).tolist()) for s in range(20)}
    assert orders == {(2, 0, 1, 3), (2, 1, 0, 3)}
    assert (zorder_permutation(local, np.random.default_rng(7)) == zorder_permutation(local, np.random.default_rng(7))).all()


def test_points_just_outside_are_clamped_onto_the_region():
    local = np.array([[-0.3, 2.5], [0.5, 2.5], [3.5, -1.0]])  # (0, 2), (0, 2) and (3, 0) after clamping
    order = zorder_permutation(local, np.random.default_rng(0)).tolist()
    assert order[0] == 2 and sorted(order[1:]) == [0, 1]  # key(3, 0) = 5 < key(0, 2) = 8, a tie after


def test_empty_input():
    assert zorder_permutation(np.zeros((0, 2)), np.random.default_rng(0)).tolist() == []
