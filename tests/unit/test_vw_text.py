"""Feature data must reach VW as data: no string in a request can change the example's syntax."""

from __future__ import annotations

import json
from typing import Any

import pytest
import vowpalwabbit

from bandit_service.domain import Candidate
from bandit_service.learners import vw_text
from bandit_service.learners.vw import VWLearner, cost_from_reward

NASTY = [
    "plain",
    "a|b",
    "a:1.5",
    "two words",
    "tab\there",
    "new\nline",
    "cr\rreturn",
    "pipe | action id=other",
    "percent%20",
    "equals=sign",
    "ünïcødé ✓",
    "\u00a0nbsp",
    "shared",
    "",
]


@pytest.mark.parametrize("text", NASTY)
def test_escaped_text_contains_no_vw_syntax(text: str) -> None:
    escaped = vw_text.escape(text)
    assert not set(escaped) & set("|: \t\r\n\u00a0="), escaped
    assert escaped.isascii()


def test_escape_is_injective() -> None:
    samples = [*NASTY, "a%7Cb", "%", "%25", "a=b", "a%3Db"]
    assert len({vw_text.escape(s) for s in samples}) == len(set(samples))


def test_each_feature_renders_to_exactly_one_token() -> None:
    features = {name: value for name, value in zip(NASTY, NASTY, strict=True) if name}
    line = vw_text.action_line("id with space|", features)
    namespace, *tokens = line.split()
    assert namespace == "|action"
    assert len(tokens) == 1 + len(features)  # the id, then one token per feature
    assert line.count("|") == 1


def test_numbers_booleans_lists_and_namespaces() -> None:
    line = vw_text.shared_line(
        {"price": 2.5, "new": True, "tags": ["x y", "z"], "user": {"age": 30}},
        slot_index=1,
        slot_features={"size": "big"},
    )
    assert line == (
        "shared |context price:2.5 new:1 tags=x%20y tags=z |user age:30 "
        "|slot slot_index=1 |slot size=big"
    )


def test_bad_namespace_name_is_refused() -> None:
    with pytest.raises(ValueError, match="namespace"):
        vw_text.render_namespaces({"a b": {"x": 1}}, "context")


def test_vw_accepts_hostile_features_and_returns_one_probability_each() -> None:
    learner = VWLearner("--cb_explore_adf --epsilon 0.1 -q ca")
    candidates = [Candidate(id=text or "empty", features={text or "f": text}) for text in NASTY]
    pmf = learner.scorer({"q": "x | y:1"}, candidates).pmf(0, {}, list(range(len(candidates))))
    assert len(pmf) == len(candidates)
    assert sum(pmf) == pytest.approx(1.0, abs=1e-5)
    learner.close()


def test_cost_is_minus_reward() -> None:
    assert cost_from_reward(1.0) == -1.0
    assert cost_from_reward(-0.5) == 0.5


def test_line_cache_follows_feature_changes() -> None:
    cache = vw_text.ActionLineCache(max_entries=2)
    assert cache.line("a", {"x": True}) == " |action id=a x:1"
    assert cache.line("a", {"x": 1}) == " |action id=a x:1"  # equal values render equally
    assert cache.line("a", {"x": False}) == " |action id=a x:0"
    assert cache.line("a", {"x": 1.5}) == " |action id=a x:1.5"
    assert cache.line("a", {"x": ["p", "q"]}) == " |action id=a x=p x=q"
    assert cache.line("b", {"n": {"x": "v"}}) == " |action id=b |n x=v"
    assert cache.line("c", {}) == " |action id=c"  # evicts; still right afterwards
    assert cache.line("a", {"x": "s"}) == " |action id=a x=s"


def test_learning_labels_the_chosen_candidate() -> None:
    learner = VWLearner("--cb_explore_adf --epsilon 0.0")
    candidates = [Candidate("a"), Candidate("b"), Candidate("c")]
    for _ in range(20):
        learner.learn_slot({}, 0, {}, candidates, 1, 0.5, 1.0)  # b earns reward 1
    pmf = learner.scorer({}, candidates).pmf(0, {}, [0, 1, 2])
    assert pmf[1] == max(pmf) and pmf[1] > 0.9
    learner.close()


def test_direct_pylibvw_calls_match_the_public_api() -> None:
    """VWLearner bypasses pyvw's per-line wrappers; results must equal ws.predict/ws.learn."""
    import random

    args = "--cb_explore_adf --epsilon 0.2 -q ca --quiet --random_seed 3"
    fast = VWLearner(args)
    public = vowpalwabbit.Workspace(args)
    rng = random.Random(5)
    candidates = [Candidate(f"c{i}", {"t": f"v{i % 3}", "x": i / 10}) for i in range(8)]
    for step in range(60):
        context = {"u": rng.choice("abc"), "w": rng.random()}
        lines = [vw_text.shared_line(context, 0, {})]
        lines += [vw_text.action_line(c.id, c.features) for c in candidates]
        assert fast.predict_lines(lines) == public.predict(lines)
        chosen, reward = rng.randrange(8), rng.choice([0.0, 1.0])
        fast.learn_slot(context, 0, {}, candidates, chosen, 0.3, reward)
        lines[1 + chosen] = f"0:{-reward!r}:0.3{lines[1 + chosen]}"
        public.learn(lines)
        assert step >= 0
    final = [vw_text.shared_line({"u": "a", "w": 0.5}, 0, {})]
    final += [vw_text.action_line(c.id, c.features) for c in candidates]
    assert fast.predict_lines(final) == public.predict(final)
    assert max(fast.predict_lines(final)) > 0.5  # it did learn something
    public.finish()
    fast.close()


def _uncached(features: dict[str, Any], namespace: str) -> str:
    """The renderer's definition, feature by feature, without any cache."""
    flat: list[str] = []
    nested = []
    for name, value in features.items():
        if isinstance(value, dict):
            tokens: list[str] = []
            for inner, inner_value in value.items():
                vw_text._render_feature(inner, inner_value, tokens)
            nested.append(f" |{name} {' '.join(tokens)}")
        else:
            vw_text._render_feature(name, value, flat)
    return (f" |{namespace} {' '.join(flat)}" if flat else "") + "".join(nested)


def test_cached_rendering_equals_the_definition() -> None:
    """The token caches must never change the text: equal keys that render differently
    (0.0 / -0.0), values of several types under one name, names and values needing escapes,
    and second (cached) renderings."""
    cases: list[dict[str, Any]] = [
        {"x": 0.0, "y": "a b", "é:=": "ü|x", "n": 3, "t": True},
        {"x": -0.0, "y": "a b", "é:=": "v", "n": 3.0, "t": 1},
        {"x": 1, "y": ["p", "q r"], "n": False, "u": {"age": 0.1, "x": -2.5e-7}},
        {"x": "1", "y": "", "n": 1e300, "u": {"age": "0.1", "x": 0}},
    ]
    for _round in range(2):
        for features in cases:
            assert vw_text.render_namespaces(features, "context") == _uncached(features, "context")


def test_eligible_candidates_splice_the_label_like_a_join() -> None:
    candidates = [Candidate(f"c{i}", {"f": i, "g": "x y"}) for i in range(4)]
    eligible = vw_text.EligibleCandidates(candidates)
    assert list(eligible) == candidates and eligible.position["c2"] == 2
    for chosen in range(4):
        lines = [vw_text.action_line(c.id, c.features) for c in candidates]
        lines[chosen] = "0:-1.0:0.25" + lines[chosen]
        assert eligible.labelled(chosen, "0:-1.0:0.25") == "\n".join(lines)


def test_a_stored_rendering_is_used_as_is_and_the_features_decode_on_demand() -> None:
    """The trainer's contexts: the serving engine's rendering plus the JSON it was made from.
    The shared line is built from the rendering without decoding; learners that read the
    features (fakes, error messages) still see the logged context."""
    context = {"device": "ios", "hour": 7, "user": {"age": 0.25, "vip": True}}
    line = vw_text.render_context(context)
    assert line == " |context device=ios hour:7 |user age:0.25 vip:1"
    stored = vw_text.RenderedContext(line, json.dumps(context))
    for slot, features in ((0, {}), (2, {"pos": "top", "ad": {"size": 3}})):
        assert vw_text.shared_line(stored, slot, features) == vw_text.shared_line(
            context, slot, features
        )
    assert stored._data is None  # never decoded for the text
    assert dict(stored) == context and len(stored) == 3 and stored["hour"] == 7
    # The rendering wins over the JSON: it is what the engine served from.
    assert vw_text.shared_line(vw_text.RenderedContext(" |context x=1", "{}"), 0, {}) == (
        "shared |context x=1 |slot slot_index=0"
    )
    assert vw_text.render_context({}) == ""
