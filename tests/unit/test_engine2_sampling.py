"""The cheaper sampling, run-length and rendering paths give exactly the old answers; the
event's uniforms keep their stated construction and are uniform and independent."""

from __future__ import annotations

import hashlib
import math
import random
import statistics

import pytest
from scipy import stats

from bandit_service.candidate_sets import KeptCandidates
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.engine import DecisionEngine, sampling
from bandit_service.errors import InvalidRequest
from bandit_service.learners import vw_text
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import parse_policy
from bandit_service.store import compact


def _reference_uniforms(event_id: str, count: int) -> list[float]:
    """The stated construction of ``sampling.event_uniforms``, spelled out: block ``j`` is
    BLAKE2b-512 of the id's UTF-8 bytes with person ``b"bandit-draws"`` and salt ``j``
    (16 bytes, little-endian); each big-endian 64-bit word gives its top 53 bits / 2**53."""
    out: list[float] = []
    block = 0
    while len(out) < count:
        digest = hashlib.blake2b(
            event_id.encode("utf-8"), person=b"bandit-draws", salt=block.to_bytes(16, "little")
        ).digest()
        for at in range(0, 64, 8):
            out.append((int.from_bytes(digest[at : at + 8], "big") >> 11) / 2**53)
        block += 1
    return out[:count]


def _ids(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [f"e{i}" for i in range(count // 5)] + [
        "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
        for _ in range(count - count // 5)
    ]


def test_event_uniforms_are_their_construction() -> None:
    """Pins the generator: a change would change which candidate every event id draws."""
    for event_id in [*_ids(5, 500), "", "0b6f6c4e-8a39-4c0e-9d8f-0f6a5cbd1234"]:
        uniform = sampling.event_uniforms(event_id)
        assert [uniform() for _ in range(20)] == _reference_uniforms(event_id, 20)
    # One value by hand, independent of the helper above.
    first = hashlib.blake2b(b"e0", person=b"bandit-draws", salt=bytes(16)).digest()[:8]
    assert sampling.event_uniforms("e0")() == (int.from_bytes(first, "big") >> 11) * 2.0**-53


def test_event_uniforms_are_reproducible_and_differ_between_ids() -> None:
    ids = _ids(6, 2000)
    streams = []
    for event_id in ids:
        once, again = sampling.event_uniforms(event_id), sampling.event_uniforms(event_id)
        drawn = [once() for _ in range(20)]  # across blocks (eight uniforms a block)
        assert drawn == [again() for _ in range(20)]
        assert all(0.0 <= u < 1.0 and (u * 2**53).is_integer() for u in drawn)
        assert len(set(drawn)) == len(drawn)
        streams.append(tuple(drawn))
    # Distinct ids, distinct streams: a repeat of 53-bit values among 2,000 would have
    # probability ~2e-10 for independent uniforms.
    assert len({s[0] for s in streams}) == len(set(ids))


N_IDS = 20_000
DRAWS = 18  # the first three blocks' words, up to the third block's second


def _uniform_table() -> list[list[float]]:
    return [
        [uniform() for _ in range(DRAWS)]
        for uniform in (sampling.event_uniforms(f"stat-{i}") for i in range(N_IDS))
    ]


def test_event_uniforms_are_uniform_at_every_position() -> None:
    """Each draw position, over 20,000 ids, against U[0, 1): chi-square on 50 equal bins
    (49 degrees of freedom; expected 400 a bin) and Kolmogorov-Smirnov. 36 tests at
    alpha = 1e-4 each: a false alarm rate of 0.4% over random id sets (Bonferroni); the
    ids are fixed, so the test is deterministic. Also the mean: its standard error is
    sqrt(1 / 12 / 20,000) = 0.002, and 5 of those allow a false alarm rate of 6e-7."""
    table = _uniform_table()
    bins = 50
    for position in range(DRAWS):
        column = [row[position] for row in table]
        counts = [0] * bins
        for u in column:
            counts[int(u * bins)] += 1
        assert stats.chisquare(counts).pvalue > 1e-4, (position, counts)
        assert stats.kstest(column, "uniform").pvalue > 1e-4, position
        assert abs(statistics.fmean(column) - 0.5) < 5 * math.sqrt(1 / 12 / N_IDS), position


def test_event_uniforms_are_independent_of_each_other_and_of_the_next_id() -> None:
    """Pairs of uniforms on a 10 x 10 grid (chi-square, 99 degrees of freedom, expected 200
    a cell): consecutive draws of one id (within a block, and across the block boundary
    at 7-8 and 15-16), draws two apart, and the first draws of consecutive ids. Pearson's
    correlation of each pair is ~N(0, 1 / 20,000) for independent uniforms: |r| < 4.5
    standard errors (two-sided false alarm rate 7e-6 each). 24 pairs at alpha = 1e-4."""
    table = _uniform_table()
    pairs: list[tuple[list[float], list[float]]] = []
    for a, b in [(0, 1), (1, 2), (6, 7), (7, 8), (8, 9), (15, 16), (0, 2), (7, 9), (0, 8)]:
        pairs.append(([row[a] for row in table], [row[b] for row in table]))
    for position in (0, 1, 7, 8):
        column = [row[position] for row in table]
        pairs.append((column[:-1], column[1:]))
    limit = 4.5 / math.sqrt(N_IDS)
    for index, (xs, ys) in enumerate(pairs):
        grid = [0] * 100
        for x, y in zip(xs, ys, strict=True):
            grid[int(x * 10) * 10 + int(y * 10)] += 1
        assert stats.chisquare(grid).pvalue > 1e-4, index
        assert abs(statistics.correlation(xs, ys)) < limit, index


def _lists(rng: random.Random) -> list[list[float]]:
    out: list[list[float]] = [
        [1.0],
        [0.0],
        [0.0, 0.0],
        [-0.0, 0.5, 0.5],
        [0.0, 1.0],
        [math.nan, 1.0],
        [1.0, math.nan],
        [math.inf, 1.0],
        [1.0, math.inf, 0.5],
        [-1.0, 2.0],
        [0.5, -0.0, -1e-300, 0.5],
        [1e-300] * 70,
        [math.inf, math.inf, 1.0],
        [1e308, 1e308, 1.0],
    ]
    for _ in range(3000):
        n = rng.choice([1, 2, 3, 17, 50, 64, 500])
        kind = rng.random()
        if kind < 0.4:
            weights = [rng.random() for _ in range(n)]
        elif kind < 0.6:  # epsilon-greedy shaped, greedy anywhere
            weights = [0.1 / n] * n
            weights[rng.randrange(n)] += 0.9
        elif kind < 0.8:  # zeros mixed in
            weights = [rng.random() if rng.random() < 0.5 else 0.0 for _ in range(n)]
        else:  # anything, negatives too
            weights = [rng.uniform(-1, 1) for _ in range(n)]
        total = sum(w for w in weights if w > 0) or 1.0
        out.append([w / total for w in weights])
    return out


def test_draw_picks_what_the_scan_picked() -> None:
    rng = random.Random(11)
    specials = [0.0, -0.0, 0.999999999999, 1.0, 2.0, -0.5, math.nan, math.inf, 5e-324]
    for probabilities in _lists(rng):
        total = sum(probabilities)
        for u in [rng.random() for _ in range(6)] + specials + [total, math.nextafter(total, 0)]:
            got = sampling.draw(probabilities, u)
            assert got == sampling._draw_by_scan(probabilities, u), (probabilities, u)


def test_draw_through_normalise_picks_what_the_scan_picked() -> None:
    rng = random.Random(12)
    for weights in _lists(rng):
        p = sampling.normalise(weights)
        for u in [rng.random() for _ in range(10)] + [0.0, 1.0, sum(p), math.nan]:
            assert sampling.draw(p, u) == sampling._draw_by_scan(p, u)
            assert sampling.draw_normalised(p, u) == sampling._draw_by_scan(p, u)
        for index in range(len(p)):
            assert sampling.is_greedy_normalised(p, index) == sampling.is_greedy(p, index)
    for n in (1, 2, 50, 500):  # the uniform exploration distribution
        q = [1.0 / n] * n
        for u in [rng.random() for _ in range(50)]:
            assert sampling.draw_normalised(q, u) == sampling._draw_by_scan(q, u)


def test_is_greedy_normalised_near_one_half() -> None:
    rng = random.Random(15)
    for n in (2, 3, 10, 500, 5000):
        for _ in range(200):
            top = 0.5 + rng.choice([0.0, 1e-7, 1e-6, 2e-6, 1e-3, rng.random() / 2])
            weights = [top] + [(1 - top) * rng.random() for _ in range(n - 1)]
            weights[rng.randrange(1, n)] = 1 - top  # a rival as large as the rest allows
            p = sampling.normalise(weights)
            for index in (0, *range(1, n, max(1, n // 7))):
                assert sampling.is_greedy_normalised(p, index) == sampling.is_greedy(p, index)


def _positions(rng: random.Random) -> list[list[int]]:
    out: list[list[int]] = [[], [0], [3], list(range(500)), list(range(7, 507))]
    for _ in range(4000):
        n = rng.choice([1, 5, 63, 64, 65, 100, 499, 500, 700])
        kind = rng.random()
        if kind < 0.4:  # the engine's shapes: all but a few
            positions = list(range(n))
            for _ in range(rng.randint(0, 8)):
                if positions:
                    del positions[rng.randrange(len(positions))]
        elif kind < 0.6:  # increasing, many gaps
            positions = sorted(rng.sample(range(n + rng.randint(0, n)), n))
        elif kind < 0.8:  # anything
            positions = [rng.randrange(n + 3) for _ in range(n)]
        else:  # almost increasing
            positions = list(range(n))
            for _ in range(rng.randint(1, 3)):
                positions[rng.randrange(n)] = rng.randrange(2 * n)
        out.append(positions)
    return out


def test_runs_are_the_scans_runs() -> None:
    rng = random.Random(13)
    for positions in _positions(rng):
        got, expected = compact.runs(positions), compact._runs_by_scan(positions)
        assert got == expected, positions
        assert [type(x) for x in got] == [type(x) for x in expected]
        assert compact.indices(got) == positions or not positions


def test_runs_of_booleans_and_floats_as_before() -> None:
    weird: list[list[int]] = [
        [True, *range(2, 100)],
        [*range(0, 70), True, *range(71, 100)],
        [0.0, *range(1, 100)],  # type: ignore[list-item]
    ]
    for positions in weird:
        got, expected = compact.runs(positions), compact._runs_by_scan(positions)
        assert got == expected and [type(x) for x in got] == [type(x) for x in expected]


@pytest.mark.parametrize(
    "value",
    [0, 1, -7, True, False, 10**20, 2**53 + 1, 0.0, -0.0, 5e-324, 1e300, 0.1, 1 / 3,
     123456789.123, math.inf, -math.inf, math.nan],
)  # fmt: skip
def test_number_tokens_as_format_gave_them(value: float) -> None:
    out: list[str] = []
    vw_text._tokens({"x": value, "n": {"y": value}}, out)
    assert out == [f"x:{format(float(value), '.9g')}"]
    assert vw_text.render_namespaces({"n": {"y": value}}, "c") == (
        f" |n y:{format(float(value), '.9g')}"
    )


def test_number_tokens_as_format_gave_them_at_random() -> None:
    rng = random.Random(14)
    values: list[float] = [rng.uniform(-1e6, 1e6) for _ in range(3000)]
    values += [rng.random() for _ in range(3000)]
    values += [float(rng.randint(-(10**12), 10**12)) for _ in range(1000)]
    values += [rng.randint(-(10**12), 10**12) for _ in range(1000)]
    for value in values:
        out: list[str] = []
        vw_text._tokens({"x": value}, out)
        assert out == [f"x:{format(float(value), '.9g')}"]


VW_ARGS = "--cb_explore_adf --epsilon 0.1 -q ua -q sa"


def _catalogue(n: int) -> list[Candidate]:
    return [Candidate(f"c{i}", {"f": i % 3, "g": "xyz"[i % 3]}) for i in range(n)]


def test_a_kept_set_decides_as_a_plain_tuple() -> None:
    policy = parse_policy("p", {"vw_args": VW_ARGS, "holdout_share": 0})
    learners = [VWLearner(VW_ARGS), VWLearner(VW_ARGS)]
    engines = [DecisionEngine({"p": policy}, lambda _n, x=x: x) for x in learners]
    catalogue = _catalogue(30)
    kept = KeptCandidates(catalogue)
    for i in range(40):
        context = {"u": {"a": i / 40}}
        plain = engines[0].decide(
            DecisionRequest(f"e{i}", "p", tuple(catalogue), slot_list(3), context)
        )
        reused = engines[1].decide(DecisionRequest(f"e{i}", "p", kept, slot_list(3), context))
        assert plain == reused
        assert [list(s.distribution.ids) for s in reused.slots] == [[c.id for c in catalogue]] * 3
    for learner in learners:
        learner.close()


def test_a_kept_set_with_a_repeated_id_is_refused_as_before() -> None:
    policy = parse_policy("p", {"vw_args": VW_ARGS, "holdout_share": 0})
    learner = VWLearner(VW_ARGS)
    engine = DecisionEngine({"p": policy}, lambda _n: learner)
    twice = KeptCandidates([Candidate("a"), Candidate("b"), Candidate("a")])
    with pytest.raises(InvalidRequest) as refused:
        engine.decide(DecisionRequest("e", "p", twice, slot_list(1), {}))
    assert refused.value.args[0] == "duplicate candidate id 'a' (also at candidates[0])"
    with pytest.raises(InvalidRequest):
        engine.decide(DecisionRequest("e", "p", KeptCandidates([]), slot_list(1), {}))
    learner.close()
