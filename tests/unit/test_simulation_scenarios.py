"""The simulator's ground truth: each scenario's oracle is the best page, by brute force and
on hand-made worlds whose answer is known, and the scenarios do what they claim."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from simulators.scenarios import (
    SCENARIOS,
    Item,
    Visit,
    World,
    logit,
    make_scenario,
)


def _brute_force(world: World, visit: Visit, objective: str) -> float:
    """The best expected reward over every ordered page of distinct items."""
    return max(
        sum(world.expected_reward(visit, item, k, objective) for k, item in enumerate(page))  # type: ignore[arg-type]
        for page in itertools.permutations(visit.items, visit.slots)
    )


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("objective", ["click", "satisfaction"])
def test_the_oracle_is_the_best_page_by_brute_force(name: str, objective: str) -> None:
    world = make_scenario(name, seed=3, steps=400)
    rng = np.random.default_rng(0)
    for step in (0, 150, 399):
        visit = world.visit(step, rng)
        if name == "large_catalog":  # 500 items, 1 slot: the brute force is a plain max
            assert len(visit.items) == 500
        page, value = world.oracle(visit, objective)  # type: ignore[arg-type]
        assert len(page) == visit.slots == len(set(it.id for it in page))
        assert value == pytest.approx(_brute_force(world, visit, objective), rel=1e-12)
        achieved = sum(
            world.expected_reward(visit, it, k, objective)  # type: ignore[arg-type]
            for k, it in enumerate(page)
        )
        assert achieved == pytest.approx(value, rel=1e-12)


def _tiny_world(**overrides: object) -> World:
    """Two segments, two categories, no individual deviation: probabilities are exact."""
    taste = np.array([[logit(0.4), logit(0.1)], [logit(0.1), logit(0.3)]])
    values: dict[str, object] = {
        "name": "tiny",
        "description": "",
        "seed": 0,
        "categories": ("a", "b"),
        "items": (Item("x", "a", 0.0, satisfaction=0.5), Item("y", "b", 0.0, satisfaction=1.0)),
        "taste": taste,
        "user_segment": np.array([0, 1]),
        "user_dev": np.zeros((2, 2)),
    }
    values.update(overrides)
    return World(**values)  # type: ignore[arg-type]


def test_a_tiny_world_has_the_oracle_computed_by_hand() -> None:
    world = _tiny_world()
    x, y = world.items
    first = Visit(0, user=0, segment=0, items=(x, y), slots=1)
    second = Visit(0, user=1, segment=1, items=(x, y), slots=1)
    assert world.click_probability(first, x, 0) == pytest.approx(0.4)
    assert world.oracle(first, "click") == ([x], pytest.approx(0.4))
    assert world.oracle(second, "click") == ([y], pytest.approx(0.3))
    # Satisfied clicks: x gives 0.4 * 0.5 = 0.2 to segment 0, y only 0.1: x still wins;
    # for segment 1, y (0.3) beats x (0.1 * 0.5).
    assert world.oracle(first, "satisfaction") == ([x], pytest.approx(0.2))
    assert world.oracle(second, "satisfaction") == ([y], pytest.approx(0.3))


def test_position_factors_put_the_best_item_first() -> None:
    world = _tiny_world(slots=2, position=(1.0, 0.5))
    x, y = world.items
    visit = Visit(0, user=0, segment=0, items=(y, x), slots=2)
    page, value = world.oracle(visit, "click")
    assert page == [x, y]
    assert value == pytest.approx(0.4 * 1.0 + 0.1 * 0.5)


def test_drift_makes_the_least_liked_category_the_favourite() -> None:
    world = make_scenario("drift", seed=1, steps=1000)
    assert world.change_step == 500
    for s in range(world.taste.shape[0]):
        before, after = world.taste[s], world.tastes(500)[s]
        assert np.argmax(after) == np.argmin(before)
        # the old favourite is now second best
        assert np.argsort(-after)[1] == np.argmax(before)
    rng = np.random.default_rng(0)
    visit = world.visit(10, rng)
    late = Visit(700, visit.user, visit.segment, visit.items, 1)
    best_before, _ = world.oracle(visit, "click")
    best_after, _ = world.oracle(late, "click")
    assert best_before[0].category != best_after[0].category


def test_clickbait_click_and_satisfaction_optima_differ() -> None:
    world = make_scenario("clickbait", seed=2, steps=1000)
    rng = np.random.default_rng(1)
    bait_best = 0
    for step in range(500):
        visit = world.visit(step, rng)
        by_click, _ = world.oracle(visit, "click")
        by_satisfaction, _ = world.oracle(visit, "satisfaction")
        bait_best += by_click[0].clickbait
        # satisfied clicks: bait <= 0.55 * 0.15 < 0.1, an honest favourite ~0.4 * 0.85
        assert not by_satisfaction[0].clickbait
    # Bait (55% clicks) beats a favourite (40%) unless the user's own taste for it and
    # the item's quality add about 2 standard deviations (0.36 logits): a few percent.
    assert bait_best / 500 > 0.9


def test_cold_start_keeps_about_twelve_items_live_and_offers_only_live_ones() -> None:
    world = make_scenario("cold_start", seed=0, steps=4000)
    rng = np.random.default_rng(0)
    seen: set[str] = set()
    for step in range(0, 4000, 97):
        live = world.live_items(step)
        assert 11 <= len(live) <= 12
        visit = world.visit(step, rng)
        assert {it.id for it in visit.items} == {it.id for it in live}
        seen.update(it.id for it in live)
    assert len(seen) > 40  # the catalog really turns over


def test_delayed_rewards_miss_the_window_at_the_designed_rate() -> None:
    world = make_scenario("delayed", seed=0, steps=100)
    rng = np.random.default_rng(5)
    n = 20000
    late = sum(world.delay(rng) > world.policy["reward_window_seconds"] for _ in range(n)) / n
    p = math.exp(-300 / 120)
    assert abs(late - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 standard errors


def test_the_same_seed_builds_the_same_world() -> None:
    a, b, c = (make_scenario("steady", s, 100) for s in (7, 7, 8))
    assert a.items == b.items and np.array_equal(a.taste, b.taste)
    assert np.array_equal(a.user_dev, b.user_dev)
    assert a.items != c.items


def test_an_unknown_scenario_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown scenario 'nope'.*steady"):
        make_scenario("nope", 0, 10)
