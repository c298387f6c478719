"""Seeded environments with a known ground truth, for stress-testing exploration settings.

Every scenario is one :class:`World`: users in segments with latent tastes, candidates with
a category and a quality, and a click probability

    P(click | user u, item i, slot k) = position(k) * sigmoid(base + taste[segment(u), cat(i)]
                                                              + quality(i) + dev[u, cat(i)])

known exactly to the simulator (never to the policy, which sees only the user's segment
and the candidates' category and id). ``dev`` is a small per-user deviation (the latent,
individual part of taste the segment does not explain). A click may be followed by a
*satisfaction* reward with a per-item probability (``clickbait``). Rewards may arrive after
a delay (``delayed``); tastes may change at a known step (``drift``); the catalog may turn
over (``cold_start``).

The oracle knows all of this: for each visit it fills the slots with the candidates of
highest expected primary reward, in decreasing order (optimal, since the position factors
decrease and one item fills one slot), and regret is measured against it in expectation,
not on the noisy realised clicks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bandit_service.domain import Candidate

Objective = Literal["click", "satisfaction"]
OBJECTIVES: tuple[Objective, ...] = ("click", "satisfaction")


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class Item:
    id: str
    category: str
    quality: float  # logit offset
    satisfaction: float = 1.0  # P(satisfied | click)
    clickbait: bool = False
    born: int = 0  # first step it is offered
    dies: int = 2**62  # first step it is no longer offered

    def candidate(self) -> Candidate:
        return Candidate(self.id, {"category": self.category})


@dataclass(frozen=True)
class Visit:
    """One user arriving at ``step``: what the service is asked to rank."""

    step: int
    user: int
    segment: int
    items: tuple[Item, ...]
    slots: int

    @property
    def user_id(self) -> str:
        return f"user-{self.user}"

    @property
    def context(self) -> dict[str, Any]:
        return {"segment": f"s{self.segment}"}

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(item.candidate() for item in self.items)


@dataclass
class World:
    """A scenario: catalog, users, tastes and the reward model. Built by :func:`make_scenario`.

    ``taste[s, c]`` is a logit per segment and category; ``taste_after`` replaces it from
    ``change_step`` on (drift). ``clickbait_logit`` is the click logit of clickbait items,
    the same for every segment.
    """

    name: str
    description: str
    seed: int
    categories: tuple[str, ...]
    items: tuple[Item, ...]
    taste: np.ndarray
    user_segment: np.ndarray
    user_dev: np.ndarray
    slots: int = 1
    position: tuple[float, ...] = (1.0,)
    base: float = 0.0
    clickbait_logit: float = 0.0
    taste_after: np.ndarray | None = None
    change_step: int | None = None
    offered: int | None = None  # a random subset of this many live items per visit
    mean_delay: float = 0.0  # seconds; exponential, 0 = immediate
    satisfaction_delay: float = 0.0
    has_satisfaction: bool = False
    policy: dict[str, Any] = field(default_factory=dict)  # the scenario's base policy (TOML)

    # -- ground truth -----------------------------------------------------------------------
    def tastes(self, step: int) -> np.ndarray:
        if self.taste_after is not None and self.change_step is not None:
            return self.taste_after if step >= self.change_step else self.taste
        return self.taste

    def click_probability(self, visit: Visit, item: Item, slot: int) -> float:
        if item.clickbait:
            logit_value = self.clickbait_logit
        else:
            c = self.categories.index(item.category)
            logit_value = (
                self.base
                + float(self.tastes(visit.step)[visit.segment, c])
                + item.quality
                + float(self.user_dev[visit.user, c])
            )
        return self.position[slot] * sigmoid(logit_value)

    def expected_reward(self, visit: Visit, item: Item, slot: int, objective: Objective) -> float:
        """E[primary reward] of showing ``item`` in ``slot``: clicks, or satisfied clicks."""
        p = self.click_probability(visit, item, slot)
        return p * item.satisfaction if objective == "satisfaction" else p

    def oracle(self, visit: Visit, objective: Objective) -> tuple[list[Item], float]:
        """The best page for this visit and its expected primary reward.

        Every slot's reward is ``position(k) * v(item)`` with ``position`` decreasing, so by
        the rearrangement inequality the best page puts the items of highest ``v`` in slot
        order.
        """
        values = sorted(visit.items, key=lambda it: -self.expected_reward(visit, it, 0, objective))[
            : visit.slots
        ]
        total = sum(self.expected_reward(visit, it, k, objective) for k, it in enumerate(values))
        return values, total

    # -- sampling -------------------------------------------------------------------------
    def live_items(self, step: int) -> list[Item]:
        return [it for it in self.items if it.born <= step < it.dies]

    def visit(self, step: int, rng: np.random.Generator) -> Visit:
        user = int(rng.integers(len(self.user_segment)))
        live = self.live_items(step)
        if self.offered is not None and self.offered < len(live):
            chosen = sorted(rng.choice(len(live), size=self.offered, replace=False).tolist())
            live = [live[i] for i in chosen]
        else:
            order = rng.permutation(len(live)).tolist()  # no position in the request is special
            live = [live[i] for i in order]
        return Visit(step, user, int(self.user_segment[user]), tuple(live), self.slots)

    def delay(self, rng: np.random.Generator) -> float:
        return float(rng.exponential(self.mean_delay)) if self.mean_delay > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "items": len(self.items),
            "categories": len(self.categories),
            "users": len(self.user_segment),
            "segments": int(self.taste.shape[0]),
            "slots": self.slots,
            "position": list(self.position),
            "change_step": self.change_step,
            "offered": self.offered,
            "mean_delay_seconds": self.mean_delay,
            "reward_window_seconds": self.policy.get("reward_window_seconds"),
            "has_satisfaction": self.has_satisfaction,
        }


# -- scenario builders ----------------------------------------------------------------------
SEGMENTS = 4
USERS = 2000
USER_DEV = 0.3  # sd of the per-user, per-category taste deviation (logits)
# Click rates by the rank a segment gives a category: a clear favourite, a long tail.
RANK_RATES = (0.40, 0.15, 0.10, 0.07, 0.05, 0.03)


def _base_policy(**overrides: Any) -> dict[str, Any]:
    """The policy every scenario starts from: the default policy's learner on a [0, 1]
    reward, no holdout (sweep ``holdout_share`` to measure lift), a short window."""
    policy: dict[str, Any] = {
        "vw_args": "--cb_explore_adf --epsilon 0.05 -q ca -q sa",
        "reward_min": 0.0,
        "reward_max": 1.0,
        "default_reward": 0.0,
        "reward_window_seconds": 10.0,
        "holdout_share": 0.0,
        "category_feature": "category",
        "rules": {},
    }
    policy.update(overrides)
    return policy


def _ranked_tastes(rng: np.random.Generator, categories: int) -> np.ndarray:
    """taste[s, c] = logit(RANK_RATES[rank]) where each segment ranks the categories in its
    own random order, with a different favourite per segment where possible."""
    rates = list(RANK_RATES[:categories]) + [RANK_RATES[-1]] * max(0, categories - len(RANK_RATES))
    taste = np.zeros((SEGMENTS, categories))
    favourites = rng.permutation(categories)
    for s in range(SEGMENTS):
        rest = [c for c in rng.permutation(categories).tolist() if c != favourites[s % categories]]
        order = [int(favourites[s % categories]), *rest]
        for rank, c in enumerate(order):
            taste[s, c] = logit(rates[rank])
    return taste


def _users(rng: np.random.Generator, categories: int) -> tuple[np.ndarray, np.ndarray]:
    segment = rng.integers(SEGMENTS, size=USERS)
    dev = rng.normal(0.0, USER_DEV, size=(USERS, categories))
    return segment, dev


def _catalog(
    rng: np.random.Generator, categories: tuple[str, ...], per_category: int, sd: float = 0.2
) -> list[Item]:
    return [
        Item(f"item-{c}-{j}", cat, float(rng.normal(0.0, sd)))
        for c, cat in enumerate(categories)
        for j in range(per_category)
    ]


def _categories(n: int) -> tuple[str, ...]:
    return tuple(f"cat{c}" for c in range(n))


def steady(seed: int, steps: int) -> World:
    rng = np.random.default_rng([seed, 1])
    cats = _categories(6)
    segment, dev = _users(rng, len(cats))
    return World(
        "steady", "stationary tastes; 12 items (6 categories x 2), all offered, 1 slot",
        seed, cats, tuple(_catalog(rng, cats, 2)), _ranked_tastes(rng, len(cats)), segment, dev,
        policy=_base_policy(),
    )  # fmt: skip


def drift(seed: int, steps: int) -> World:
    """At half-time every segment's ranking of categories rotates by one: the favourite
    becomes second best, and the *least* liked category becomes the favourite. A policy
    that never explores keeps showing the old favourite (still decent) and never learns
    that the category it tried least is now the best."""
    world = steady(seed, steps)
    after = np.zeros_like(world.taste)
    rates = [logit(r) for r in RANK_RATES]
    for s in range(SEGMENTS):
        order = sorted(range(len(world.categories)), key=lambda c: -world.taste[s, c])
        rotated = [order[-1], *order[:-1]]  # old rank r -> r + 1, the last -> 0
        for rank, c in enumerate(rotated):
            after[s, c] = rates[rank]
    world.name, world.taste_after, world.change_step = "drift", after, steps // 2
    world.description = "steady, then at half-time each segment's least liked category becomes its favourite and the old favourite second"  # noqa: E501
    return world


def cold_start(seed: int, steps: int) -> World:
    """A new item arrives every ``steps / 40`` steps and lives for 12 arrival periods, so
    about 12 are live at a time and no item is there from start to end. New items come with
    a quality the policy must discover (their category only tells part of the story)."""
    rng = np.random.default_rng([seed, 3])
    cats = _categories(6)
    segment, dev = _users(rng, len(cats))
    period = max(1, steps // 40)
    items: list[Item] = []
    for j in range(52):  # 12 alive at step 0, then one more per period
        born = (j - 12) * period
        cat = cats[int(rng.integers(len(cats)))]
        items.append(Item(f"item-{j}", cat, float(rng.normal(0.0, 0.6)), born=born,
                          dies=born + 12 * period))  # fmt: skip
    return World(
        "cold_start", "a new item every steps/40 steps, each live for 12 periods (~12 live)",
        seed, cats, tuple(items), _ranked_tastes(rng, len(cats)), segment, dev,
        policy=_base_policy(),
    )  # fmt: skip


def position_bias(seed: int, steps: int) -> World:
    world = steady(seed, steps)
    world.name = "position_bias"
    world.description = "steady tastes, 3 ranked slots; click probability x 1, 0.6, 0.35 by slot"
    world.slots, world.position = 3, (1.0, 0.6, 0.35)
    return world


def delayed(seed: int, steps: int) -> World:
    """Clicks arrive after an exponential delay of mean 120 s against a 300 s window
    (one visit per second): exp(-300/120) = 8.2% of clicks arrive late and are not learned."""
    world = steady(seed, steps)
    world.name = "delayed"
    world.description = "steady tastes; clicks arrive after Exp(mean 120 s), window 300 s (8% late)"
    world.mean_delay = 120.0
    world.policy = _base_policy(reward_window_seconds=300.0)
    return world


def clickbait(seed: int, steps: int) -> World:
    """One category (``bait``) of items that everyone clicks often (55%) but rarely enjoys
    (15% satisfied), beside honest items in six categories (satisfied 85% after a click;
    a segment's favourite is clicked about 40% of the time, more by some users).
    Optimising clicks converges on the bait for every segment; optimising satisfaction
    shows each segment its favourite category: more satisfaction and a broader diet."""
    rng = np.random.default_rng([seed, 7])
    cats = _categories(6)
    segment, dev = _users(rng, len(cats) + 1)
    items = [
        Item(it.id, it.category, it.quality, satisfaction=0.85)
        for it in _catalog(rng, cats, 2)
    ]  # fmt: skip
    items += [Item(f"bait-{j}", "bait", 0.0, satisfaction=0.15, clickbait=True) for j in range(2)]
    taste = _ranked_tastes(rng, len(cats))
    return World(
        "clickbait", "12 honest items (satisfied 85%) + 2 bait items (55% clicks, 15% satisfied)",
        seed, (*cats, "bait"), tuple(items), np.hstack([taste, np.zeros((SEGMENTS, 1))]),
        segment, dev, clickbait_logit=logit(0.55), satisfaction_delay=5.0,
        has_satisfaction=True, policy=_base_policy(reward_window_seconds=20.0),
    )  # fmt: skip


def large_catalog(seed: int, steps: int) -> World:
    rng = np.random.default_rng([seed, 9])
    cats = _categories(25)
    segment, dev = _users(rng, len(cats))
    return World(
        "large_catalog", "500 items in 25 categories, all 500 offered on every visit, 1 slot",
        seed, cats, tuple(_catalog(rng, cats, 20, sd=0.5)), _ranked_tastes(rng, len(cats)),
        segment, dev, policy=_base_policy(),
    )  # fmt: skip


SCENARIOS: dict[str, Callable[[int, int], World]] = {
    "steady": steady,
    "drift": drift,
    "cold_start": cold_start,
    "position_bias": position_bias,
    "delayed": delayed,
    "clickbait": clickbait,
    "large_catalog": large_catalog,
}


def make_scenario(name: str, seed: int, steps: int) -> World:
    """The named scenario, built from ``seed`` (the same seed builds the same world)."""
    try:
        builder = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})") from None
    return builder(seed, steps)
