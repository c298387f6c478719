"""Prometheus metrics: live counters of this process, and store-derived gauges at scrape.

Two kinds of numbers, so they add up however many processes serve:

* **Live** (this module's ``LIVE`` registry): decisions, slots, rewards, request latency,
  batch-writer queue, batch size and commit latency, model reloads. They are counted where
  they happen. With several worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (``serve
  --workers N`` makes one when it is unset): every process writes its values to files
  there and a scrape of any worker sums counters and histograms across all of them
  (prometheus-client's multiprocess mode). Per-process values (serving model version,
  reloads) carry a ``process`` label instead of being summed.
* **Store-derived** (:class:`StoreMetrics`): trainer lag, learned events, model version
  and age, and the sliding-window reward view (on time, late, default, mean). They are
  read from the store at scrape time, so they are right even when the trainer runs in
  another process or on another host, and they do not double when several workers
  answer scrapes. Reads are cached for a few seconds to bound the store load.

The decide path only increments pre-resolved counter children (a dictionary look-up and
an add; a memory-mapped write in multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from bandit_service.policy import PolicyConfig

__all__ = ["CONTENT_TYPE_LATEST", "LIVE", "StoreMetrics", "exposition"]

log = logging.getLogger(__name__)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
PROCESS = str(os.getpid())

LIVE = CollectorRegistry(auto_describe=True)

DECISIONS = Counter(
    "bandit_decisions",
    "Decisions logged (new event ids), per policy and arm.",
    ["policy", "arm"],
    registry=LIVE,
)
SLOTS = Counter(
    "bandit_slots",
    "Slots filled, per policy, arm and whether the draw explored; exploration share = "
    'rate(explored="true") / rate(all).',
    ["policy", "arm", "explored"],
    registry=LIVE,
)
REWARDS = Counter(
    "bandit_rewards",
    "Primary rewards stored, per policy, arm and timeliness (on_time, late). Defaulted "
    "slots are only known once a window closes: see bandit_window_decisions.",
    ["policy", "arm", "timeliness"],
    registry=LIVE,
)
REWARD_VALUE = Gauge(  # a gauge: rewards may be negative, a counter may not decrease
    "bandit_reward_value_sum",
    "Running sum of the primary reward values stored; deltas over deltas of "
    "bandit_rewards_total give the mean reward of an interval.",
    ["policy", "arm", "timeliness"],
    registry=LIVE,
    multiprocess_mode="sum",  # totals: processes that exited still count
)
REQUEST_SECONDS = Histogram(
    "bandit_http_request_duration_seconds",
    "Request latency per method and route template (the raw path is never a label).",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=LIVE,
)
REQUESTS = Counter(
    "bandit_http_requests",
    "Requests per method, route template and status code.",
    ["method", "route", "status"],
    registry=LIVE,
)
WRITER_QUEUE = Gauge(
    "bandit_writer_queue_depth",
    "Writes waiting for the group-commit writer (summed over live processes).",
    registry=LIVE,
    multiprocess_mode="livesum",
)
WRITER_BATCH_ROWS = Histogram(
    "bandit_writer_batch_rows",
    "Writes per group-commit transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=LIVE,
)
WRITER_COMMIT_SECONDS = Histogram(
    "bandit_writer_commit_seconds",
    "Duration of one group-commit transaction (write and commit).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=LIVE,
)
MODEL_RELOADS = Counter(
    "bandit_model_reloads",
    "Newer models loaded by a serving process, per process.",
    ["process"],
    registry=LIVE,
)
SERVING_MODEL_VERSION = Gauge(
    "bandit_serving_model_version",
    "Model version a serving process decides with, per policy and process.",
    ["policy", "process"],
    registry=LIVE,
    multiprocess_mode="livemax",
)

_decision_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}


def observe_decision(policy: str, arm: str, explored: int, slots: int) -> None:
    """Count one new decision: ``explored`` of its ``slots`` draws explored."""
    children = _decision_children.get((policy, arm))
    if children is None:
        children = (
            DECISIONS.labels(policy, arm),
            SLOTS.labels(policy, arm, "true"),
            SLOTS.labels(policy, arm, "false"),
        )
        _decision_children[(policy, arm)] = children
    children[0].inc()
    if explored:
        children[1].inc(explored)
    if slots - explored:
        children[2].inc(slots - explored)


def observe_reward(policy: str, arm: str, value: float, late: bool) -> None:
    timeliness = "late" if late else "on_time"
    REWARDS.labels(policy, arm, timeliness).inc()
    REWARD_VALUE.labels(policy, arm, timeliness).inc(value)


def observe_reload(policy: str, version: int) -> None:
    MODEL_RELOADS.labels(PROCESS).inc()
    SERVING_MODEL_VERSION.labels(policy, PROCESS).set(version)


def observe_serving(policy: str, version: int) -> None:
    SERVING_MODEL_VERSION.labels(policy, PROCESS).set(version)


def process_stopped() -> None:
    """Drop this process's live gauges (queue depth, serving version) from the sums."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


# -- store-derived metrics -------------------------------------------------------------------
class StoreMetrics(Collector):
    """Trainer progress and the sliding-window reward view, read from the store at scrape.

    Window: decisions created in ``[now - reward_window - W, now - reward_window)``, i.e.
    whose reward window has closed within the last ``W`` seconds (``BANDIT_METRICS_WINDOW_
    SECONDS``), so no decision is judged on rewards that may still arrive. Per policy and
    arm: decisions; decisions with an on-time primary reward, with only late ones, and with
    none (the policy's default reward was used); and the mean page reward: per slot the
    on-time rewards aggregated as the policy says, summed over the page, a page without
    any at the default reward (exact for one-slot pages or a default reward of 0).
    """

    def __init__(
        self,
        db: Engine,
        policies: Mapping[str, PolicyConfig],
        window_seconds: float,
        cache_seconds: float = 5.0,
    ) -> None:
        self._db = db
        self._policies = dict(policies)  # replaced by the service's on a policy change
        self._window = window_seconds
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._cached_at = -float("inf")

    def set_policies(self, policies: Mapping[str, PolicyConfig]) -> None:
        """Report these policies from the next scrape on (a policy added or changed)."""
        self._policies = dict(policies)

    def collect(self) -> Iterator[Metric]:
        """The store's families plus ``bandit_store_metrics_up``: when the store cannot be
        read, the live metrics are still served and ``up`` says why the rest is missing."""
        with self._lock:
            if time.monotonic() - self._cached_at >= self._cache_seconds:
                up = GaugeMetricFamily(
                    "bandit_store_metrics_up", "1 if the store-derived metrics could be read."
                )
                try:
                    self._cached = self._read(time.time())
                    up.add_metric([], 1)
                except Exception as exc:
                    log.warning("store metrics unavailable: %s", type(exc).__name__,
                                extra={"event": "metrics", "error": str(exc)[:200]})  # fmt: skip
                    self._cached = []
                    up.add_metric([], 0)
                self._cached = [*self._cached, up]
                self._cached_at = time.monotonic()
            yield from self._cached

    def _read(self, now: float) -> list[Metric]:
        from sqlalchemy.orm import Session

        from bandit_service.store import repository

        version = GaugeMetricFamily(
            "bandit_model_version", "Newest checkpointed model version.", labels=["policy"]
        )
        age = GaugeMetricFamily(
            "bandit_model_age_seconds",
            "Seconds since the newest checkpoint was written.",
            labels=["policy"],
        )
        learned = CounterMetricFamily(
            "bandit_trainer_learned_events",
            "Events learned by the current model lineage (rate() = learned events/s).",
            labels=["policy"],
        )
        lag = GaugeMetricFamily(
            "bandit_trainer_lag_seconds",
            "How long the oldest learnable (window closed) event has waited to be learned.",
            labels=["policy"],
        )
        decisions = GaugeMetricFamily(
            "bandit_window_decisions",
            "Decisions whose reward window closed in the metrics window, by reward outcome "
            "(on_time, late_only, default).",
            labels=["policy", "arm", "outcome"],
        )
        mean = GaugeMetricFamily(
            "bandit_window_mean_reward",
            "Mean page reward of those decisions (defaulted slots at the default reward).",
            labels=["policy", "arm"],
        )
        with Session(self._db) as session:
            for name, policy in dict(self._policies).items():
                checkpoint = repository.latest_checkpoint(session, name, policy.model_key)
                position = checkpoint["position"] if checkpoint else 0
                version.add_metric([name], checkpoint["model_version"] if checkpoint else 0)
                learned.add_metric([name], checkpoint["learned_events"] if checkpoint else 0)
                if checkpoint is not None:
                    age.add_metric([name], max(0.0, now - checkpoint["created_at"]))
                oldest = repository.oldest_pending_created_at(session, name, position)
                waited = 0.0
                if oldest is not None and policy.learning_mode != "logging_only":
                    waited = max(0.0, now - (oldest + policy.reward_window_seconds))
                lag.add_metric([name], waited)
                until = now - policy.reward_window_seconds
                for arm, stats in _window(session, policy, until - self._window, until).items():
                    for outcome in ("on_time", "late_only", "default"):
                        decisions.add_metric([name, arm, outcome], stats[outcome])
                    total = stats["on_time"] + stats["late_only"] + stats["default"]
                    if total:
                        mean.add_metric([name, arm], stats["reward_sum"] / total)
        return [version, age, learned, lag, decisions, mean]


def _window(
    session: Any, policy: PolicyConfig, since: float, until: float
) -> dict[str, dict[str, float]]:
    """Per arm: decisions by reward outcome and the sum of their page rewards."""
    from sqlalchemy import func, select

    from bandit_service.rewards import PRIMARY, aggregate
    from bandit_service.store.models import DecisionRow, RewardRow

    in_window = (
        DecisionRow.policy == policy.name,
        DecisionRow.created_at >= since,
        DecisionRow.created_at < until,
    )
    stats: dict[str, dict[str, float]] = {}
    counts = session.execute(
        select(DecisionRow.arm, func.count()).where(*in_window).group_by(DecisionRow.arm)
    )
    for arm, count in counts:
        stats[arm] = {"on_time": 0, "late_only": 0, "default": count, "reward_sum": 0.0}
    rewards = session.execute(
        select(DecisionRow.arm, RewardRow.event_id, RewardRow.slot, RewardRow.value, RewardRow.late)
        .join(RewardRow, RewardRow.event_id == DecisionRow.event_id)
        .where(*in_window, RewardRow.kind == PRIMARY)
        .order_by(RewardRow.id)
    )
    per_event: dict[str, tuple[str, dict[int, list[float]], list[bool]]] = {}
    for arm, event_id, slot, value, late in rewards:
        entry = per_event.setdefault(event_id, (arm, {}, [False]))
        if late:
            entry[2][0] = True
        else:
            entry[1].setdefault(slot, []).append(value)
    for arm, slots, any_late in per_event.values():
        arm_stats = stats[arm]
        arm_stats["default"] -= 1
        if slots:
            arm_stats["on_time"] += 1
            arm_stats["reward_sum"] += sum(
                aggregate(values, policy.reward_aggregation) or 0.0 for values in slots.values()
            )
        elif any_late[0]:
            arm_stats["late_only"] += 1
    for arm_stats in stats.values():
        arm_stats["reward_sum"] += (arm_stats["default"] + arm_stats["late_only"]) * (
            policy.default_reward
        )
    return stats


def exposition(store: StoreMetrics) -> bytes:
    """The text format: live metrics (summed over processes in multiprocess mode), then the
    store-derived ones (computed once, by whichever process answers the scrape)."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        live = generate_latest(registry)
    else:
        live = generate_latest(LIVE)
    stored = CollectorRegistry()  # no auto-describe: registering must not read the store
    stored.register(store)
    return live + generate_latest(stored)
