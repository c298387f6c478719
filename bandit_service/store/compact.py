"""The compact decision-log encoding: candidate sets stored once, distributions as numbers.

A decision used to carry every candidate's features (a catalogue repeats from request to
request) and, per slot, the whole distribution as ``[[id, p], ...]``. Reading and decoding
those was most of the trainer's time per event. Now:

* **Candidate sets are content-addressed.** The candidates' JSON text is stored once in
  ``candidate_sets`` under the BLAKE2b-128 hash of that text; a decision references it by
  ``candidate_set``. Same text, same key; a different text collides with probability
  ~2^-128 per pair.
* **Distributions are positional.** A slot stores ``eligible``, the indices into the
  candidate set of the candidates it was drawn over, as flattened half-open runs
  (``[0, 50]`` = candidates 0..49, in order; ``[0, 3, 4, 50]`` skips candidate 3), and
  ``p``, their probabilities in the same order as little-endian IEEE-754 doubles in
  base64: exact, ~11 bytes a probability instead of ~30, one string to decode instead of
  a list of 50-500 lists (which cost the trainer more than VW's parsing), and cheaper to
  encode than JSON numbers. The slot's chosen ``id`` and ``probability`` stay as they are.
* **Repeated probabilities are stored as runs.** When a slot's probabilities take few
  distinct values -- an epsilon-greedy slot: epsilon/N for every candidate but the greedy
  one -- they go in ``p_runs`` instead of ``p``: ``[value, count, value, count, …]``, the
  values as JSON numbers (the shortest text that reads back as the same double; PostgreSQL's
  ``jsonb`` keeps a number's digits as written). A 500 x 5 decision's slots were ~27 KB of
  base64 that PostgreSQL parsed as JSON, compressed and logged to its WAL with every
  decision, and that the reward look-up read and parsed again; as runs they are ~0.4 KB.
  Exact: runs group equal doubles, and a run is only made of finite values, with zeros
  only when none is ``-0.0`` (the one other pair of distinct doubles that compare equal).
  Older code reads only ``p``: migration 0010's downgrade packs every ``p_runs`` back.

Readers outside the trainer get the classic shape back (:func:`expand_slots`): the log's
meaning is unchanged, only its storage. A slot whose distribution names an id missing from
the candidate set (not produced by the engine) keeps the classic ``pmf`` form, and every
reader accepts both forms.

The engine's slots arrive with their positions (``pmf`` the engine's
:class:`~bandit_service.domain.Distribution`: positions in the request's candidate order
and probabilities), and
:func:`compact_row_slots` stores those as they are; any other ``pmf`` (``[[id, p], …]``
written by tests, scripts, older callers) is mapped id by id (:func:`compact_slots`). Both
give the same bytes for the same distribution: candidate ids are unique in a request, so an
id's position is the position the engine drew it at.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import operator
import struct
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import chain, groupby, repeat
from typing import Any

import orjson

from bandit_service.domain import Distribution

KEY_LENGTH = 32  # hex characters of a BLAKE2b-128 digest


def candidate_set(candidates: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """``(key, json_text)`` of a request's candidates (``[{"id":…, "features":…}, …]``).

    A kept candidate set (a catalog selection, or inline candidates seen before) carries
    both, computed once (``content_key``, see ``bandit_service/candidate_sets.py``),
    instead of per decision."""
    cached: tuple[str, str] | None = getattr(candidates, "content_key", None)
    if cached is not None:
        return cached
    data = orjson.dumps(candidates)
    return hashlib.blake2b(data, digest_size=16).hexdigest(), data.decode()


class CandidateIds(list[str]):
    """A candidate set's ids with each one's position (as :func:`compact_slots` maps them:
    the last, if repeated), built once for a kept candidate set instead of per decision."""

    position: dict[str, int]

    def __init__(self, ids: Iterable[str]) -> None:
        super().__init__(ids)
        self.position = {cid: i for i, cid in enumerate(self)}


def candidate_ids(candidates: Sequence[dict[str, Any]]) -> Sequence[str]:
    """The ids of a request's candidates (``[{"id":…, "features":…}, …]``), for
    :func:`compact_slots`: a kept set's :class:`CandidateIds`, else a new list."""
    cached: CandidateIds | None = getattr(candidates, "ids", None)
    if cached is not None:
        return cached
    return [c["id"] for c in candidates]


def runs(indices: Iterable[int]) -> list[int]:
    """Indices as flattened half-open runs of consecutive values: [0,1,2,5] -> [0,3,5,6]."""
    if type(indices) is list and len(indices) >= 64:
        found = _few_runs(indices)
        if found is not None:
            return found
    return _runs_by_scan(indices)


def _runs_by_scan(indices: Iterable[int]) -> list[int]:
    """:func:`runs`, one index at a time."""
    out: list[int] = []
    for i in indices:
        if out and out[-1] == i:
            out[-1] = i + 1
        else:
            out += [i, i + 1]
    return out


def _few_runs(positions: list[int]) -> list[int] | None:
    """:func:`runs` of a long increasing list with few gaps, or None (use the scan).

    The engine's slots after the first are such lists: 500 candidates less the few placed
    in earlier slots, two to five runs, which the scan walks at ~25-30 µs a slot. Here each
    run's end is found by bisection on ``positions[j] - j`` (constant within a run, larger
    after a gap when the list increases), and the result is then checked in C: its runs
    laid end to end must give back ``positions`` and no run may begin where the one before
    it ends. Runs with those two properties are exactly what the scan returns (a run breaks
    where, and only where, an index is not its predecessor plus one), so a list that does
    not increase fails the check and is scanned instead. ~15 µs a 500-candidate slot; a
    500 x 5 decision's row compacts in ~170-240 µs instead of ~240-350 µs.
    """
    n = len(positions)
    limit = 8 + n // 32  # past this many runs, the scan is as cheap
    out: list[int] = []
    at = 0
    try:
        while at < n:
            start = positions[at]
            end = bisect_right(range(n), start - at, lo=at + 1, key=lambda j: positions[j] - j)
            out += (start, start + end - at)
            at = end
            if len(out) > 2 * limit:
                return None
        laid = list(chain.from_iterable(map(range, out[::2], out[1::2])))
    except TypeError:  # not integers
        return None
    if laid != positions or any(map(operator.eq, out[2::2], out[1:-1:2])):
        return None
    return out


def indices(eligible: Sequence[int]) -> list[int]:
    """The inverse of :func:`runs`."""
    out: list[int] = []
    for k in range(0, len(eligible), 2):
        out.extend(range(eligible[k], eligible[k + 1]))
    return out


def pack_probabilities(values: Sequence[float]) -> str:
    """Doubles as base64 text (exact: the same floats come back). (``b2a_base64`` without
    its newline is what ``base64.b64encode`` calls, minus a Python-level wrapper.)"""
    return binascii.b2a_base64(struct.pack(f"<{len(values)}d", *values), newline=False).decode(
        "ascii"
    )


def unpack_probabilities(text: str) -> list[float]:
    data = base64.b64decode(text)
    return list(struct.unpack(f"<{len(data) // 8}d", data))


def probability_runs(values: Sequence[float]) -> list[float] | None:
    """``values`` as ``[value, count, …]`` runs of equal doubles, or None when that is not
    at least four times shorter than the values, or would not be exact (see the module
    docstring).

    A distribution of distinct values (softmax, say) is turned down in ~2 µs for 500 of
    them: neither its first nor its last value repeats (two ``count`` calls, in C). An
    epsilon-greedy slot over 500 candidates, three runs, is grouped in ~8 µs, about what
    packing its 500 doubles costs."""
    n = len(values)
    limit = n // 4
    if limit == 0 or (values.count(values[0]) == 1 and values.count(values[-1]) == 1):
        return None
    out: list[float] = []
    for value, group in groupby(values):
        if len(out) == 2 * limit:
            return None
        if type(value) is not float or not math.isfinite(value):
            return None  # ints, bools and the like keep the packed form (as doubles)
        members = list(group)
        if value == 0.0 and any(math.copysign(1.0, v) < 0.0 for v in members):
            return None  # -0.0 == 0.0: a run would not give the sign back
        out += (value, len(members))
    return out


def expand_runs(runs: Sequence[float]) -> list[float]:
    """The inverse of :func:`probability_runs`."""
    counts = [int(c) for c in runs[1::2]]
    return list(chain.from_iterable(map(repeat, runs[::2], counts)))


def slot_probabilities(slot: dict[str, Any]) -> list[float]:
    """A compact slot's probabilities, from ``p_runs`` or ``p``."""
    found = slot.get("p_runs")
    if found is None:
        return unpack_probabilities(slot["p"])
    runs = list(found)
    runs[::2] = [float(v) for v in runs[::2]]  # a JSON reader may give 1 for 1.0
    return expand_runs(runs)


def compact_slots(slots: Sequence[dict[str, Any]], ids: Sequence[str]) -> list[dict[str, Any]]:
    """Slots with ``pmf`` replaced by ``eligible`` runs and probabilities ``p`` (or
    ``p_runs``).

    For slots whose ``pmf`` is classic (``[[id, p], …]``): each id is mapped to its position
    in ``ids`` (given as :class:`CandidateIds`, a kept set's ids bring their positions
    along). The engine's slots take :func:`compact_row_slots`, which maps nothing.
    """
    position: dict[str, int] | None = getattr(ids, "position", None)
    if position is None:
        position = {cid: i for i, cid in enumerate(ids)}
    out = []
    for slot in slots:
        pmf: Sequence[Any] = slot.get("pmf") or []
        try:
            found = [position[cid] for cid, _p in pmf]
        except KeyError:  # an id outside the candidate set: keep the slot as written
            found = []
        if not found:
            out.append(_classic_slot(slot))
            continue
        out.append(_compact_slot(slot, found, [p for _cid, p in pmf]))
    return out


def compact_row_slots(
    slots: Sequence[dict[str, Any]], candidates: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The stored slots of a decision row whose candidates are ``candidates`` (its logged
    ``[{"id", "features"}, …]``).

    A slot whose ``pmf`` is the engine's :class:`~bandit_service.domain.Distribution`
    over these candidates (as ``service.decision_row`` puts it) is stored from its positions and
    probabilities directly: on the decision write path (up to 500 candidates x 5 slots)
    that saves a dict look-up and two list entries per probability, and the candidate ids
    are not even listed. Any other slot goes through :func:`compact_slots`. The result is
    the same either way (tests/unit/test_compact_distribution.py).
    """
    out: list[dict[str, Any]] = []
    ids: Sequence[str] | None = None
    for slot in slots:
        dist = slot.get("pmf")
        if type(dist) is Distribution and _fits(dist, candidates):
            out.append(_compact_slot(slot, dist.positions, dist.probabilities))
            continue
        if ids is None:
            ids = candidate_ids(candidates)
        out.extend(compact_slots([slot], ids))
    return out


def _fits(pmf: Distribution, candidates: Sequence[dict[str, Any]]) -> bool:
    """Whether ``pmf``'s positions index ``candidates`` (a cheap check, O(1): the same
    number of candidates, and the same id at its first position). ``decision_row`` builds
    both from one request, so this holds; a row put together otherwise, where it does not,
    is compacted by id instead."""
    positions = pmf.positions
    if not positions or len(pmf.ids) != len(candidates):
        return False
    first = positions[0]
    return bool(candidates[first]["id"] == pmf.ids[first])


def _compact_slot(
    slot: dict[str, Any], positions: Sequence[int], probabilities: Sequence[float]
) -> dict[str, Any]:
    """``slot`` with ``pmf`` replaced by ``eligible`` (runs of ``positions``) and ``p``, or
    ``p_runs`` when the probabilities repeat (:func:`probability_runs`).

    The usual case, one contiguous run, is recognised by a C-speed list comparison
    instead of a Python loop."""
    first = positions[0]
    n = len(positions)
    listed = positions if type(positions) is list else list(positions)
    contiguous = positions[-1] == first + n - 1 and listed == list(range(first, first + n))
    # A copy less "pmf", keys in order (~0.2 µs; a filtering comprehension took ~0.5).
    compact = dict(slot)
    compact.pop("pmf", None)
    compact["eligible"] = [first, first + n] if contiguous else runs(listed)
    repeated = probability_runs(probabilities)
    if repeated is not None:
        compact["p_runs"] = repeated
    else:
        compact["p"] = pack_probabilities(probabilities)
    return compact


def _classic_slot(slot: dict[str, Any]) -> dict[str, Any]:
    """A slot stored as written (classic ``pmf``): a Distribution becomes a plain list."""
    pmf = slot.get("pmf")
    if isinstance(pmf, Distribution):
        return {**slot, "pmf": list(pmf.classic())}
    return slot


def expand_slots(slots: Sequence[dict[str, Any]], ids: Sequence[str]) -> list[dict[str, Any]]:
    """The classic form (``pmf`` as ``[[id, p], …]``) of stored slots, in either form."""
    out = []
    for slot in slots:
        if "eligible" not in slot:
            out.append(slot)
            continue
        classic = {k: v for k, v in slot.items() if k not in ("eligible", "p", "p_runs")}
        chosen = [ids[i] for i in indices(slot["eligible"])]
        probabilities = slot_probabilities(slot)
        classic["pmf"] = [[cid, p] for cid, p in zip(chosen, probabilities, strict=True)]
        out.append(classic)
    return out
