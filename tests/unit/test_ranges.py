"""Range sets against a model made of plain Python sets of byte offsets."""

from hypothesis import given
from hypothesis import strategies as st

from safefs import ranges

spans = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=12)


def from_list(items):
    """A RangeSet of pairs in any order, possibly empty or overlapping."""
    out = ranges.EMPTY
    for s, e in items:
        out = ranges.add(out, s, e)
    return out


def as_set(rs):
    return {i for s, e in rs for i in range(s, e)}


def well_formed(rs):
    return all(s < e for s, e in rs) and all(a[1] < b[0] for a, b in zip(rs, rs[1:]))


@given(spans, spans)
def test_add_subtract_match_a_model(adds, subs):
    rs, model = ranges.EMPTY, set()
    for s, e in adds:
        rs = ranges.add(rs, s, e)
        model |= set(range(s, e))
        assert well_formed(rs) and as_set(rs) == model
    for s, e in subs:
        rs = ranges.subtract(rs, s, e)
        model -= set(range(s, e))
        assert well_formed(rs) and as_set(rs) == model


@given(spans, st.integers(0, 60), st.integers(0, 60))
def test_missing_matches_a_model(adds, a, b):
    rs = from_list(adds)
    start, end = min(a, b), max(a, b)
    gaps = ranges.missing(rs, start, end)
    assert as_set(gaps) == set(range(start, end)) - as_set(rs)
    assert well_formed(gaps)


@given(spans, st.integers(0, 60))
def test_clip(adds, end):
    rs = from_list(adds)
    assert as_set(ranges.clip(rs, end)) == {i for i in as_set(rs) if i < end}


def test_adjacent_ranges_merge():
    assert ranges.add(((0, 4),), 4, 8) == ((0, 8),)
    assert ranges.total(((0, 4), (10, 12))) == 6


@given(spans, spans)
def test_add_in_place_matches_add_and_undo_takes_it_back(base, adds):
    rs = from_list(base)
    lst = list(rs)
    changes = []
    for s, e in adds:
        before = tuple(lst)
        change = ranges.add_in_place(lst, s, e)
        rs = ranges.add(rs, s, e)
        assert tuple(lst) == rs and (change is None) == (rs == before)
        if change is not None:  # what it reports is exactly what changed
            lo, gone, made = change
            assert before[:lo] + (made,) + before[lo + len(gone) :] == rs
            assert ranges.end_at(rs, made[0]) == made[1]
        changes.append(change)
    for change in reversed(changes):
        if change is not None:
            ranges.undo_in_place(lst, change)
    assert tuple(lst) == from_list(base)


@given(spans)
def test_from_sorted_rebuilds_what_the_journal_stored(adds):
    rs = from_list(adds)
    assert ranges.from_sorted(list(rs)) == rs
    assert ranges.from_sorted(sorted((s, e) for s, e in adds)) == rs
