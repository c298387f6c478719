"""Personalizer's ``ServiceConfiguration`` and ``PolicyContract`` as policy settings.

A Personalizer *loop* is one policy (``BANDIT_PERSONALIZER_POLICY``). The mapping:

=========================  ===========================================================
Personalizer               policy (TOML) / facade
=========================  ===========================================================
explorationPercentage      ``--epsilon`` in ``vw_args`` (epsilon-greedy exploration)
rewardWaitTime             ``reward_window_seconds``
defaultReward              ``default_reward``
rewardAggregation          ``reward_aggregation`` (earliest -> first, sum, last)
learningMode               ``learning_mode`` (Online, Apprentice, LoggingOnly)
modelExportFrequency       ``model_update_seconds`` (minimum time between model swaps)
PolicyContract.arguments   ``vw_args``
logRetentionDays           ``retention_days`` (-1, forever -> 0, keep until deleted)
modelRetrainDays, name     kept by the facade (store table ``service_meta``) and
                           returned as set; see docs/migrating-from-personalizer.md
=========================  ===========================================================

An update edits the policy's TOML file (comments and other keys kept), is validated as a
whole before anything is written, and is written atomically; the previous file is kept in
``.history/``. The new content is a new policy version; whether the model continues is
decided by the usual lineage rule (``model_key``: an exploration-only change continues).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from bandit_service.policy import PolicyConfig, without_options
from bandit_service.store.models import MetaRow

VW_DEFAULT_EPSILON = 0.05  # what cb_explore_adf uses without --epsilon
# Explorers for which ``--epsilon`` is not "the share of explored ranks".
_OTHER_EXPLORERS = {"--first", "--bag", "--cover", "--softmax", "--squarecb", "--rnd",
                    "--regcb", "--regcbopt", "--synthcover"}  # fmt: skip
# Personalizer's own default learning settings, with the current exploration kept.
DEFAULT_ARGUMENTS = "--cb_explore_adf --epsilon {epsilon} --power_t 0 -l 0.001 --cb_type mtr -q ::"

AGGREGATION_TO_POLICY = {"earliest": "first", "first": "first", "sum": "sum", "last": "last",
                         "latest": "last"}  # fmt: skip
AGGREGATION_FROM_POLICY = {"first": "earliest", "sum": "sum", "last": "last"}
MODE_TO_POLICY = {"online": "online", "apprentice": "apprentice", "loggingonly": "logging_only"}
MODE_FROM_POLICY = {"online": "Online", "apprentice": "Apprentice", "logging_only": "LoggingOnly"}


class ConfigurationError(ValueError):
    """An invalid configuration value; ``field`` is the JSON field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# -- durations --------------------------------------------------------------------------
_ISO = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_TIMESPAN = re.compile(r"^(?:(?P<d>\d+)[.])?(?P<h>\d{1,2}):(?P<m>\d{2}):(?P<s>\d{2}(?:\.\d+)?)$")


def parse_duration(text: Any, field: str) -> float:
    """ISO 8601 (``PT5M``, ``P1DT2H``) or .NET TimeSpan (``00:05:00``, ``1.00:00:00``)."""
    if not isinstance(text, str):
        raise ConfigurationError(field, "must be an ISO 8601 duration such as PT10M")
    value = text.strip().upper()
    match = _ISO.match(value) if value not in ("P", "PT") and not value.endswith("T") else None
    match = match or _TIMESPAN.match(value)
    if match is None:
        raise ConfigurationError(field, f"{text!r} is not an ISO 8601 duration such as PT10M")
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    return (parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60
            + parts.get("s", 0))  # fmt: skip


def format_duration(seconds: float) -> str:
    """Seconds as the ISO 8601 duration Personalizer returned (``PT10M``, ``P1D``)."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    frac = seconds - whole
    out = "P" + (f"{days}D" if days else "")
    time_part = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    if secs or frac:
        time_part += f"{secs + frac:g}S"
    if time_part:
        out += "T" + time_part
    return out if out != "P" else "PT0S"


# -- exploration in vw_args ---------------------------------------------------------------
def _tokens(vw_args: str) -> list[str]:
    return shlex.split(vw_args)


def exploration_of(vw_args: str) -> float:
    """The epsilon of an epsilon-greedy policy (VW's default when absent); 0 for others."""
    tokens = _tokens(vw_args)
    for i, token in enumerate(tokens):
        name, _, inline = token.partition("=")
        if name == "--epsilon":
            raw = inline or (tokens[i + 1] if i + 1 < len(tokens) else "")
            try:
                return float(raw)
            except ValueError:
                return VW_DEFAULT_EPSILON
    if any(t.split("=", 1)[0] in _OTHER_EXPLORERS for t in tokens):
        return 0.0
    return VW_DEFAULT_EPSILON


def with_exploration(vw_args: str, epsilon: float) -> str:
    """``vw_args`` exploring with ``epsilon`` (refused for non-epsilon-greedy policies)."""
    tokens = _tokens(vw_args)
    other = sorted({t.split("=", 1)[0] for t in tokens} & _OTHER_EXPLORERS)
    if other:
        raise ConfigurationError(
            "explorationPercentage",
            f"the policy explores with {other[0]}, not epsilon-greedy; change its learning "
            "settings (configurations/policy arguments) instead",
        )
    kept = without_options(tokens, {"--epsilon"})
    return shlex.join([*kept, "--epsilon", f"{epsilon:g}"])


# -- the policy file ------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("TOML numbers must be finite")
        return repr(float(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def patch_policy_text(text: str, updates: dict[str, Any]) -> str:
    """``text`` with top-level ``key = value`` lines set to ``updates``; comments, tables
    and all other keys stay as they were. The result is checked by parsing it back."""
    lines = text.splitlines()
    first_table = next(
        (i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines)
    )
    missing = []
    for key, value in updates.items():
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        found = [i for i in range(first_table) if pattern.match(lines[i])]
        rendered = f"{key} = {_toml_value(value)}"
        if found:
            lines[found[0]] = rendered
        else:
            missing.append(rendered)
    lines[first_table:first_table] = missing
    result = "\n".join(lines) + "\n"
    try:
        expected = {**tomllib.loads(text), **updates}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError("body", f"the policy file is not valid TOML now: {exc}") from None
    try:
        same = tomllib.loads(result) == expected
    except tomllib.TOMLDecodeError:
        same = False
    if not same:
        raise ConfigurationError(
            "body",
            "the policy file cannot be updated safely (a changed key spans several lines); "
            "edit it by hand",
        )
    return result


def write_policy_file(folder: Path, name: str, text: str) -> Path:
    """Write ``<name>.toml`` atomically (temp file, fsync, rename); keep the old content
    in ``.history/<name>.<unix ms>.toml`` so a change can be undone by hand."""
    path = folder / f"{name}.toml"
    if path.exists():
        history = folder / ".history"
        history.mkdir(exist_ok=True)
        (history / f"{name}.{int(time.time() * 1000)}.toml").write_bytes(path.read_bytes())
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- ServiceConfiguration <-> policy ----------------------------------------------------------
def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    if key not in body or body[key] is None:
        return None
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(key, "must be a number")
    if not low <= value <= high:
        raise ConfigurationError(key, f"must be between {low:g} and {high:g}")
    return float(value)


def policy_updates(
    body: dict[str, Any], policy: PolicyConfig, reload_seconds: float = 2.0
) -> dict[str, Any]:
    """The TOML keys a ``ServiceConfiguration`` body changes (only those that differ).
    ``reload_seconds`` is how often serving processes look for a newer model anyway."""
    updates: dict[str, Any] = {}
    if body.get("modelExportFrequency") is not None:
        seconds = parse_duration(body["modelExportFrequency"], "modelExportFrequency")
        if not 0 < seconds <= 366 * 86400:
            raise ConfigurationError("modelExportFrequency", "must be between 0 and a year")
        # At or below the reload interval, every newer model is served as it is found.
        wanted = seconds if seconds > reload_seconds else 0.0
        if wanted != policy.model_update_seconds:
            updates["model_update_seconds"] = wanted
    epsilon = _number(body, "explorationPercentage", 0.0, 1.0)
    if epsilon is not None and not math.isclose(epsilon, exploration_of(policy.vw_args)):
        updates["vw_args"] = with_exploration(policy.vw_args, epsilon)
    if body.get("rewardWaitTime") is not None:
        seconds = parse_duration(body["rewardWaitTime"], "rewardWaitTime")
        if not 1 <= seconds <= 366 * 86400:
            raise ConfigurationError("rewardWaitTime", "must be between 1 second and a year")
        if seconds != policy.reward_window_seconds:
            updates["reward_window_seconds"] = seconds
    default = _number(body, "defaultReward", policy.reward_min, policy.reward_max)
    if default is not None and default != policy.default_reward:
        updates["default_reward"] = default
    if body.get("rewardAggregation") is not None:
        raw = body["rewardAggregation"]
        how = AGGREGATION_TO_POLICY.get(raw.lower()) if isinstance(raw, str) else None
        if how is None:
            raise ConfigurationError("rewardAggregation", "must be earliest, sum or last")
        if how != policy.reward_aggregation:
            updates["reward_aggregation"] = how
    if body.get("learningMode") is not None:
        raw = body["learningMode"]
        mode = MODE_TO_POLICY.get(raw.lower()) if isinstance(raw, str) else None
        if mode is None:
            raise ConfigurationError("learningMode", "must be Online, Apprentice or LoggingOnly")
        if mode != policy.learning_mode:
            updates["learning_mode"] = mode
    if body.get("logRetentionDays") is not None:
        days = body["logRetentionDays"]
        if isinstance(days, bool) or not isinstance(days, int) or days < -1 or days == 0:
            raise ConfigurationError("logRetentionDays", "must be -1 (forever) or a positive "
                                     "number of days")  # fmt: skip
        retention = 0.0 if days == -1 else float(days)
        if 0 < retention * 86400 <= updates.get("reward_window_seconds",
                                                 policy.reward_window_seconds):  # fmt: skip
            raise ConfigurationError(
                "logRetentionDays",
                "must exceed the reward wait time, or events would be removed before "
                "they can be learned",
            )
        if retention != policy.retention_days:
            updates["retention_days"] = retention
    return updates


def facade_updates(body: dict[str, Any]) -> dict[str, Any]:
    """The settings the facade keeps itself, validated."""
    out: dict[str, Any] = {}
    if body.get("modelRetrainDays") is not None:
        days = body["modelRetrainDays"]
        if isinstance(days, bool) or not isinstance(days, int) or days < 0:
            raise ConfigurationError("modelRetrainDays", "must be a whole number >= 0")
        out["modelRetrainDays"] = days
    return out


def service_configuration(
    policy: PolicyConfig, state: dict[str, Any], reload_seconds: float
) -> dict[str, Any]:
    return {
        "rewardWaitTime": format_duration(policy.reward_window_seconds),
        "defaultReward": policy.default_reward,
        "rewardAggregation": AGGREGATION_FROM_POLICY[policy.reward_aggregation],
        "explorationPercentage": exploration_of(policy.vw_args),
        "modelExportFrequency": format_duration(policy.model_update_seconds or reload_seconds),
        "logMirrorEnabled": False,
        "logRetentionDays": math.ceil(policy.retention_days) if policy.retention_days else -1,
        "lastConfigurationEditDate": state.get("lastConfigurationEditDate"),
        "learningMode": MODE_FROM_POLICY[policy.learning_mode],
        "isAutoOptimizationEnabled": False,
        "modelRetrainDays": state.get("modelRetrainDays", 0),
    }


def policy_contract(policy: PolicyConfig, state: dict[str, Any]) -> dict[str, Any]:
    return {"name": state.get("policyName") or policy.name, "arguments": policy.vw_args}


# -- facade state in the store ------------------------------------------------------------------
def _state_key(policy: str) -> str:
    key = f"personalizer:{policy}"
    return key if len(key) <= 64 else "personalizer:" + hashlib.sha256(policy.encode()).hexdigest()


def load_state(session: Session, policy: str) -> dict[str, Any]:
    raw = session.scalar(select(MetaRow.value).where(MetaRow.key == _state_key(policy)))
    return orjson.loads(raw) if raw else {}


def save_state(session: Session, policy: str, state: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    insert = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(MetaRow)
    value = orjson.dumps(state).decode()
    session.execute(
        insert.values(key=_state_key(policy), value=value).on_conflict_do_update(
            index_elements=["key"], set_={"value": value}
        )
    )
