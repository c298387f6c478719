"""Decision requests over a policy's catalog: which candidates, and who may ask.

Mixing rules (``POST /v1/decisions``): ``candidates`` (inline, unchanged) or
``candidate_ids`` (catalog items, in the given order) or neither (the whole catalog, in id
order, if it fits the candidate limit); both at once is a 422.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bandit_service import catalog
from bandit_service.api.auth import Principal, admit_candidates, admit_policy
from bandit_service.api.features import MAX_FEATURES
from bandit_service.errors import InvalidRequest

if TYPE_CHECKING:
    from bandit_service.api.fast_body import FastDecision
    from bandit_service.api.schemas import DecisionIn
    from bandit_service.service import DecisionService


def catalog_candidates(
    service: DecisionService, principal: Principal, body: DecisionIn | FastDecision
) -> catalog.CatalogCandidates:
    """The request's candidates from the policy's catalog snapshot in this process.

    Per-key limits apply as for inline candidates: the candidate count, and the features
    per candidate when the key's limit is below the service's (items were checked when
    written, against the admin key that wrote them)."""
    if body.candidates is not None:
        raise InvalidRequest(
            "give `candidates` (inline) or `candidate_ids` (catalog items), not both",
            "candidate_ids",
        )
    admit_policy(principal, body.policy)
    service.engine.policy(body.policy)  # an unknown policy is answered as for inline requests
    limit = min(service.settings.max_candidates, principal.limits.max_candidates)
    selected = catalog.resolve(service.catalog.snapshot(body.policy), body.candidate_ids, limit)
    if principal.limits.max_features_per_candidate < MAX_FEATURES:
        admit_candidates(
            principal, body.policy, selected.features, "candidate_ids", most=selected.max_features
        )
    return selected
