"""Policy configuration: one TOML file per decision point, named after the policy.

A policy is data, not code. Unknown keys are an error at start-up: a typo such as
``reward_windw_seconds`` must not silently fall back to a default.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from bandit_service.rules import RulesError, RuleSet, parse_rules

RewardAggregation = Literal["sum", "first", "last"]
_AGGREGATIONS = ("sum", "first", "last")
LearningMode = Literal["online", "apprentice", "logging_only"]
_LEARNING_MODES = ("online", "apprentice", "logging_only")
# Options that only change how the pmf is formed from the scores, not what the weights mean:
# changing them keeps the trained model valid. Anything else starts a new model.
_EXPLORATION_ONLY_OPTIONS = {
    "--epsilon",
    "--first",
    "--gamma_scale",
    "--gamma_exponent",
    "--lambda",
    "--random_seed",
}
_FLAGS_WITHOUT_MODEL_MEANING = {"--quiet"}  # fmt: skip
POLICY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# VW options that touch files, sockets or the process: the service owns model storage.
_FORBIDDEN_VW_OPTIONS = {
    "-d", "--data", "-f", "--final_regressor", "-i", "--initial_regressor", "-c", "--cache",
    "--cache_file", "--daemon", "--port", "-p", "--predictions", "-r", "--raw_predictions",
    "--readable_model", "--invert_hash", "--pid_file", "--port_file", "--save_per_pass",
    "--output_feature_regularizer_binary", "--output_feature_regularizer_text",
    "--feature_mask", "--initial_weight", "--dictionary", "--dictionary_path",
    "--audit", "-a", "--num_children", "--foreground", "--json", "--dsjson",
}  # fmt: skip


def without_options(tokens: list[str], options: set[str]) -> list[str]:
    """VW argument tokens minus ``options`` and their values (``--opt v`` or ``--opt=v``)."""
    kept: list[str] = []
    skip_value = False
    for token in tokens:
        if skip_value:
            skip_value = False
            continue
        if token.split("=", 1)[0] in options:
            skip_value = "=" not in token
            continue
        kept.append(token)
    return kept


class PolicyError(ValueError):
    """A policy file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class PolicyConfig:
    """Validated settings of one policy. ``version`` identifies this exact configuration."""

    name: str
    vw_args: str = "--cb_explore_adf --epsilon 0.1 -q ca -q sa"
    slots: int = 1
    reward_min: float = -1.0
    reward_max: float = 1.0
    default_reward: float = 0.0
    reward_window_seconds: float = 3600.0
    reward_aggregation: RewardAggregation = "sum"
    learning_mode: LearningMode = "online"
    # The popularity holdout arm (see bandit_service/holdout.py).
    holdout_share: float = 0.05
    holdout_salt: str = ""
    popularity_half_life_seconds: float = 7 * 24 * 3600.0
    popularity_prior_strength: float = 10.0
    popularity_refresh_seconds: float = 60.0
    # Minimum time between two model swaps while serving (0: as soon as one is trained).
    model_update_seconds: float = 0.0
    category_feature: str = ""  # candidate feature used for the breadth guardrail
    rules: RuleSet = field(default_factory=RuleSet)  # see bandit_service/rules.py
    description: str = ""
    # Privacy (issue 10, see docs/data.md): days decisions and rewards are kept (0: until
    # deleted), and whether features that look like e-mail addresses or phone numbers are
    # accepted (refused with a 422 naming the feature by default).
    retention_days: float = 0.0
    allow_identifier_features: bool = False

    @functools.cached_property
    def version(self) -> str:
        """A short content hash of the configuration (not of the file's bytes or comments).

        Keys added after the first release count only when set away from their default, so
        upgrading does not change the version of an unchanged policy file. Cached: every
        decision logs it, and hashing the whole configuration was ~4% of a decision's CPU
        (the instance is frozen, so the hash cannot go stale)."""
        values = asdict(self)
        for key, default in _LATER_KEYS_DEFAULTS.items():
            if values[key] == default:
                del values[key]
        payload = json.dumps(values, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]

    @property
    def model_key(self) -> str:
        """Identifies the model *lineage*: the VW arguments minus exploration-only options.

        Two policy versions with the same key can continue training one model (e.g. only
        ``--epsilon`` changed); a different key (features, interactions, reductions) needs
        a new model, warm-started by replaying the logged history.
        """
        kept = [
            token
            for token in without_options(shlex.split(self.vw_args), _EXPLORATION_ONLY_OPTIONS)
            if token not in _FLAGS_WITHOUT_MODEL_MEANING
        ]
        return hashlib.sha256(" ".join(kept).encode()).hexdigest()[:12]

    @property
    def serves_baseline(self) -> bool:
        """Apprentice and logging-only policies show the baseline, never the model's draw."""
        return self.learning_mode != "online"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "version": self.version, "model_key": self.model_key}


_KEYS = {f.name for f in fields(PolicyConfig)} - {"name"}
_LATER_KEYS_DEFAULTS: dict[str, Any] = {
    "retention_days": 0.0,
    "allow_identifier_features": False,
    "model_update_seconds": 0.0,
}
_STRING_KEYS = {
    "vw_args", "description", "reward_aggregation", "learning_mode", "holdout_salt",
    "category_feature",
}  # fmt: skip
_BOOL_KEYS = {"allow_identifier_features"}


def _fail(where: str, message: str) -> PolicyError:
    return PolicyError(f"{where}: {message}")


def parse_policy(name: str, raw: dict[str, Any], where: str = "<policy>") -> PolicyConfig:
    """Validate a decoded TOML table into a :class:`PolicyConfig`."""
    if not POLICY_NAME.match(name):
        raise _fail(where, f"policy name {name!r} must match {POLICY_NAME.pattern}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _fail(
            where, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}"
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "rules":
            try:
                values["rules"] = parse_rules(value)
            except RulesError as exc:
                raise _fail(where, f"[rules] {exc}") from None
            continue
        if key in _STRING_KEYS:
            if not isinstance(value, str):
                raise _fail(where, f"{key} must be a string")
        elif key in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise _fail(where, f"{key} must be true or false")
            values[key] = value
            continue
        elif key == "slots":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _fail(where, "slots must be an integer >= 1")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(where, f"{key} must be a number")
        values[key] = value if key in _STRING_KEYS or key == "slots" else float(value)
    config = PolicyConfig(name=name, **values)
    if config.reward_aggregation not in _AGGREGATIONS:
        raise _fail(where, f"reward_aggregation must be one of {', '.join(_AGGREGATIONS)}")
    if config.learning_mode not in _LEARNING_MODES:
        raise _fail(where, f"learning_mode must be one of {', '.join(_LEARNING_MODES)}")
    if not config.reward_min < config.reward_max:
        raise _fail(where, "reward_min must be below reward_max")
    if not config.reward_min <= config.default_reward <= config.reward_max:
        raise _fail(where, "default_reward must lie within [reward_min, reward_max]")
    if not 1 <= config.reward_window_seconds <= 366 * 24 * 3600:
        raise _fail(where, "reward_window_seconds must be between 1 second and a year")
    if not 0 <= config.holdout_share <= 0.5:
        raise _fail(where, "holdout_share must be between 0 and 0.5")
    if not config.popularity_half_life_seconds >= 1:
        raise _fail(where, "popularity_half_life_seconds must be at least 1")
    if not config.popularity_prior_strength > 0:
        raise _fail(where, "popularity_prior_strength must be positive")
    if not config.popularity_refresh_seconds >= 1:
        raise _fail(where, "popularity_refresh_seconds must be at least 1")
    if not 0 <= config.model_update_seconds <= 366 * 24 * 3600:
        raise _fail(where, "model_update_seconds must be between 0 and a year")
    if not 0 <= config.retention_days <= 100 * 366:
        raise _fail(where, "retention_days must be between 0 (keep until deleted) and 36600")
    if 0 < config.retention_days * 86400 <= config.reward_window_seconds:
        raise _fail(
            where,
            "retention_days must exceed the reward window (reward_window_seconds), or "
            "decisions would be removed before they can be learned",
        )
    check_vw_args(config.vw_args, where)
    return config


def check_vw_args(vw_args: str, where: str) -> None:
    """Refuse VW arguments the service cannot run (see the policy reference)."""
    try:
        tokens = shlex.split(vw_args)
    except ValueError as exc:
        raise _fail(where, f"vw_args cannot be parsed: {exc}") from exc
    if "--cb_explore_adf" not in tokens:
        raise _fail(where, "vw_args must contain --cb_explore_adf (one decision per slot)")
    for token in tokens:
        option = token.split("=", 1)[0]
        if option in _FORBIDDEN_VW_OPTIONS:
            raise _fail(where, f"vw_args may not contain {option}: the service manages model I/O")
    from bandit_service.learners.vw import vw_args_problem  # VW is imported there only

    problem = vw_args_problem(vw_args)
    if problem is not None:
        raise _fail(where, f"Vowpal Wabbit refuses vw_args {vw_args!r}: {problem}")


def load_policy_file(path: Path) -> PolicyConfig:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _fail(str(path), f"not valid TOML: {exc}") from exc
    return parse_policy(path.stem, raw, where=str(path))


def load_policies(directory: Path) -> dict[str, PolicyConfig]:
    """Load every ``*.toml`` in ``directory``; fail on the first invalid file."""
    if not directory.is_dir():
        raise PolicyError(f"policies directory {directory} does not exist (BANDIT_POLICIES_DIR)")
    policies = {p.stem: load_policy_file(p) for p in sorted(directory.glob("*.toml"))}
    if not policies:
        raise PolicyError(f"no *.toml policy files in {directory}")
    return policies


def policy_file_marks(directory: Path) -> dict[str, tuple[int, int]]:
    """(mtime ns, size) of every ``*.toml`` in ``directory``, by policy name: what processes
    compare to notice a policy file created or changed at runtime."""
    if not directory.is_dir():
        return {}
    found = {}
    for path in directory.glob("*.toml"):
        try:
            stat = path.stat()
        except OSError:  # removed between glob and stat
            continue
        found[path.stem] = (stat.st_mtime_ns, stat.st_size)
    return found
