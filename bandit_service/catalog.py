"""The candidate catalog: per policy, items ``{id, features}`` that decisions reference.

A decision request normally carries every candidate with all its features; parsing and
validating those (50 x 10 values) was the largest per-request cost (issue 8). With a
catalog, the items are written once (admin routes, ``api/catalog_routes.py``) and a
request names them (``candidate_ids``) or omits candidates to use the whole catalog.

* **Store.** ``catalog_items`` and ``catalog_versions`` (``store/catalog.py``). Each change
  request is one transaction and one new catalog version; removed items are kept as
  tombstones for a day, so other processes see removals.
* **Every serving process** holds each policy's catalog in memory as an immutable
  :class:`CatalogSnapshot`. :meth:`Catalog.refresh` reads the version table (one small
  query) and, for a policy whose version moved, only the rows written after the version
  it knows: the version is the watermark. The service calls it from its reload loop, so
  another process's change is served within ``model_reload_seconds`` (plus the time of
  one refresh); the process that applied a change refreshes right after its commit and
  serves it at once.
* **Logging is unchanged.** A decision logs the candidates it was made over, features
  included, in the compact log's content-addressed candidate sets: rewards, the trainer,
  OPE and explanations read the same shape as for inline candidates. A snapshot keeps
  each selection as a :class:`CatalogCandidates` (``candidate_sets.KeptCandidates``:
  candidate-set key and JSON text, ids, identifier scan, VW lines), so a repeated
  selection is not serialised, hashed or rendered again per decision.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bandit_service.candidate_sets import KeptCandidates
from bandit_service.domain import Candidate, DecisionRequest
from bandit_service.errors import InvalidRequest, NotFound
from bandit_service.identifiers import find_identifier
from bandit_service.store import catalog as store

MAX_BATCH_ITEMS = 1000  # items per change request: one transaction, one body
MAX_CATALOG_ITEMS = 100_000  # live items per policy (each process holds them all)
TOMBSTONE_SECONDS = 86400.0  # removed items are remembered this long, then purged
# Selections cached per catalog version: at most this many candidates over all of them
# (each holds its logged JSON text), e.g. 1,000 selections of 50.
SELECTION_CACHE_CANDIDATES = 50_000


class CatalogCandidates(KeptCandidates):
    """Candidates taken from a catalog snapshot, in selection order, kept with what
    decisions derive from them (``candidate_sets.KeptCandidates``: ``logged`` is their
    stored form). A distinct type: the service checks catalog items for identifiers in
    its own way (:func:`catalog_identifier`). Behaves as a plain tuple everywhere else."""


def catalog_identifier(selection: CatalogCandidates) -> tuple[str, str] | None:
    """(field, kind) of the first catalog item feature in ``selection`` that looks like a
    direct identifier, or None. Items are checked when written, under the policy of that
    time; a policy may stop allowing identifiers later, so selections are checked again,
    once each (the scan is kept on the cached selection)."""
    found = selection.identifier_scan().found()
    if found is not None:  # name the catalog item, not a request field
        index = int(found[0].split("]", 1)[0].removeprefix("candidates["))
        rest = found[0].split("]", 1)[1]
        found = (f"catalog item {selection[index].id!r}{rest}", found[1])
    return found


class CatalogSnapshot:
    """One policy's catalog at one version. Immutable but for its selection cache, which
    only the event loop touches (decisions); a refresh builds a new snapshot."""

    def __init__(
        self, policy: str, version: int, updated_at: float | None, items: Mapping[str, Candidate]
    ) -> None:
        self.policy = policy
        self.version = version
        self.updated_at = updated_at
        self.items: dict[str, Candidate] = {k: items[k] for k in sorted(items)}
        self._all: CatalogCandidates | None = None
        self._selections: dict[tuple[str, ...], CatalogCandidates] = {}
        self._selected = 0  # candidates held by the cached selections

    def __len__(self) -> int:
        return len(self.items)

    def everything(self) -> CatalogCandidates:
        """Every item, in id order (code points)."""
        if self._all is None:
            self._all = CatalogCandidates(self.items.values())
        return self._all

    def select(self, ids: Sequence[str]) -> CatalogCandidates:
        """The named items in the given order; an unknown or repeated id is a 422 naming
        it (``candidate_ids[i]``)."""
        key = tuple(ids)
        found = self._selections.get(key)
        if found is not None:
            return found
        items = self.items
        chosen = []
        seen: set[str] = set()
        for i, item_id in enumerate(key):
            candidate = items.get(item_id)
            if candidate is None:
                raise InvalidRequest(
                    f"candidate {item_id!r} is not in policy {self.policy!r}'s catalog "
                    f"(version {self.version})",
                    f"candidate_ids[{i}]",
                )
            if item_id in seen:
                raise InvalidRequest(f"candidate {item_id!r} is named twice", f"candidate_ids[{i}]")
            seen.add(item_id)
            chosen.append(candidate)
        selection = CatalogCandidates(chosen)
        if self._selected + len(key) > SELECTION_CACHE_CANDIDATES:
            self._selections.clear()
            self._selected = 0
        self._selections[key] = selection
        self._selected += len(key)
        return selection

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "version": self.version,
            "updated_at": self.updated_at,
            "items": len(self.items),
        }


class Catalog:
    """Every policy's catalog snapshot in this process, kept current by :meth:`refresh`."""

    def __init__(self, db: Engine) -> None:
        self._db = db
        self._snapshots: dict[str, CatalogSnapshot] = {}
        self._refresh_lock = threading.Lock()  # one refresh at a time (loop, or a change)

    def snapshot(self, policy: str) -> CatalogSnapshot:
        found = self._snapshots.get(policy)
        return found if found is not None else CatalogSnapshot(policy, 0, None, {})

    def refresh(self) -> list[str]:
        """Apply what other processes (or this one) committed since the versions known
        here; returns the policies whose snapshot changed."""
        with self._refresh_lock, Session(self._db) as session:
            known = self._snapshots
            changed: dict[str, CatalogSnapshot] = {}
            stored = store.versions(session)
            for policy in known.keys() - stored.keys():  # the store was emptied
                changed[policy] = CatalogSnapshot(policy, 0, None, {})
            for policy, (version, updated_at, purged) in stored.items():
                current = known.get(policy)
                if current is not None and current.version == version:
                    continue
                # Reload whole when tombstones this process has not seen were purged, or
                # when the store went back (restored or recreated).
                if current is None or current.version < purged or current.version > version:
                    items: dict[str, Candidate] = {}
                    rows = store.changes(session, policy, None)
                else:
                    items = dict(current.items)
                    rows = store.changes(session, policy, current.version)
                for item_id, features, deleted in rows:
                    if deleted:
                        items.pop(item_id, None)
                    else:
                        items[item_id] = Candidate(item_id, orjson.loads(features))
                # Rows of a version committed after the version read may be applied already;
                # the next refresh applies them again, which changes nothing.
                changed[policy] = CatalogSnapshot(policy, version, updated_at, items)
            if changed:
                self._snapshots = {**known, **changed}
            return sorted(changed)

    # -- changes (each one transaction and one version) -----------------------------------
    def upsert(
        self, policy: str, items: Sequence[Candidate], *, allow_identifiers: bool
    ) -> dict[str, Any]:
        """Create or replace ``items`` (by id); the others stay."""
        return self._change(policy, items, replace=False, allow_identifiers=allow_identifiers)

    def replace(
        self, policy: str, items: Sequence[Candidate], *, allow_identifiers: bool
    ) -> dict[str, Any]:
        """Make ``items`` the whole catalog (none: clear it)."""
        return self._change(policy, items, replace=True, allow_identifiers=allow_identifiers)

    def remove(self, policy: str, item_id: str) -> dict[str, Any]:
        """Remove one item; 404 when it is not in the catalog."""
        now = time.time()
        with Session(self._db) as session, session.begin():
            version = store.next_version(session, policy, now)
            if store.remove_items(session, policy, version, now, item_id=item_id) == 0:
                raise NotFound(f"no item {item_id!r} in policy {policy!r}'s catalog", "item_id")
            count = store.live_count(session, policy)
        self.refresh()
        return {"policy": policy, "version": version, "updated_at": now, "items": count,
                "removed": 1}  # fmt: skip

    def _change(
        self, policy: str, items: Sequence[Candidate], *, replace: bool, allow_identifiers: bool
    ) -> dict[str, Any]:
        check_items(items, allow_identifiers=allow_identifiers)
        now = time.time()
        with Session(self._db) as session, session.begin():
            version = store.next_version(session, policy, now)
            store.upsert_items(session, policy, [(c.id, c.features) for c in items], version, now)
            removed = (
                store.remove_items(session, policy, version, now, older_than_version=True)
                if replace
                else 0
            )
            store.purge_tombstones(session, policy, now - TOMBSTONE_SECONDS)
            count = store.live_count(session, policy)
            if count > MAX_CATALOG_ITEMS:  # raising rolls the whole change back
                raise InvalidRequest(
                    f"the catalog would hold {count} items, more than the limit of "
                    f"{MAX_CATALOG_ITEMS}; nothing was changed",
                    "items",
                )
        self.refresh()
        return {"policy": policy, "version": version, "updated_at": now, "items": count,
                "written": len(items), "removed": removed}  # fmt: skip


def check_items(items: Sequence[Candidate], *, allow_identifiers: bool) -> None:
    """Batch size, unique ids, and (unless the policy allows them) no feature that looks
    like an e-mail address or phone number: the same rule as for request candidates."""
    if len(items) > MAX_BATCH_ITEMS:
        raise InvalidRequest(
            f"{len(items)} items exceed the limit of {MAX_BATCH_ITEMS} per request", "items"
        )
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item.id in seen:
            raise InvalidRequest(f"item id {item.id!r} appears twice", f"items[{i}].id")
        seen.add(item.id)
    if allow_identifiers:
        return
    found = find_identifier(DecisionRequest(event_id="", policy="", candidates=tuple(items),
                                            slots=()))  # fmt: skip
    if found is not None:
        field, kind = found
        field = field.replace("candidates[", "items[", 1)
        raise InvalidRequest(
            f"{field} looks like a direct identifier ({kind}); identifiers must not be "
            "features (the policy does not set allow_identifier_features)",
            field,
        )


def resolve(
    snapshot: CatalogSnapshot,
    candidate_ids: Sequence[str] | None,
    max_candidates: int,
) -> CatalogCandidates:
    """The candidates of a request that names catalog items (``candidate_ids``) or none
    (the whole catalog, which must fit ``max_candidates``)."""
    if candidate_ids is not None:
        if not candidate_ids:
            raise InvalidRequest("candidate_ids must name at least one item", "candidate_ids")
        if len(candidate_ids) > max_candidates:
            raise InvalidRequest(
                f"{len(candidate_ids)} candidates exceed the limit of {max_candidates}",
                "candidate_ids",
            )
        return snapshot.select(candidate_ids)
    if not snapshot.items:
        raise InvalidRequest(
            f"policy {snapshot.policy!r} has an empty catalog: send `candidates`, or add "
            f"items with POST /v1/policies/{snapshot.policy}/catalog/items",
            "candidates",
        )
    if len(snapshot) > max_candidates:
        raise InvalidRequest(
            f"policy {snapshot.policy!r}'s catalog holds {len(snapshot)} items, more than "
            f"the limit of {max_candidates} candidates per decision: name the candidates "
            "with `candidate_ids`",
            "candidates",
        )
    return snapshot.everything()
