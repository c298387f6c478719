"""API keys: configuration, hashing, constant-time lookup, scopes, per-key limits and rate.

No web framework here (``bandit_service/api/auth.py`` turns this into a FastAPI
dependency), so the CLI can create, hash and check keys with the same code that serves.

**Storage.** The service never sees a key's text at rest: configuration holds
``sha256:<hex>`` of each key. Keys are 256-bit random strings (``create_key``), so a fast
hash is enough: unlike passwords they cannot be guessed from a dictionary, and a slow hash
(bcrypt, argon2) would add milliseconds to every request. A presented key is hashed and
compared with *every* configured hash by ``hmac.compare_digest``, without stopping at the
first match, so response time does not depend on which entry (if any) matched or how many
leading bytes agreed.

**Configuration** (both may be given; entries are merged, names and hashes must be unique):

* ``BANDIT_API_KEYS_FILE``: a TOML file (``[[keys]]`` tables) or a JSON file (a list, or an
  object with a ``keys`` list), chosen by the ``.json`` suffix;
* ``BANDIT_API_KEYS``: the same as inline JSON.

Each entry::

    [[keys]]
    name = "checkout-web"            # shown in errors and logs; never secret
    hash = "sha256:9f86d081…"        # `bandit-service keys create` prints the entry
    scopes = ["decide", "read"]      # decide | read | admin
    policies = ["checkout"]          # optional: only these policies (default: all)
    rate_per_second = 50             # optional: token bucket per key, per process
    burst = 100                      # optional: bucket size (default: max(1, rate))
    max_body_bytes = 65536           # optional: can only narrow the global limits
    max_candidates = 100
    max_features_per_candidate = 50
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from bandit_service.config import Settings

Scope = Literal["decide", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("decide", "read", "admin")
SCOPE_MEANING = {
    "decide": "decisions, rewards, activation",
    "read": "reading decisions, policy status, lift and OPE reports, metrics",
    "admin": "policy changes, imports, deletion, retention",
}
KEY_PREFIX = "bsk_"  # makes leaked keys easy for secret scanners to spot
HASH_PREFIX = "sha256:"
HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
RAW_KEY = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")  # what create_key makes
MAX_KEY_LENGTH = 512  # longer header values are not keys; refuse before hashing them


class KeyConfigError(ValueError):
    """A key file or ``BANDIT_API_KEYS`` value that cannot be used; the message says where.

    Messages never repeat configured values: a raw key pasted into ``hash`` must not end up
    in a log or on a terminal.
    """


class KeyEntry(BaseModel):
    """One configured key, as written in the key file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    hash: str = Field(pattern=HASH_PATTERN)
    scopes: list[Scope] = Field(min_length=1)
    policies: list[str] | None = Field(default=None, min_length=1)
    rate_per_second: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    burst: int | None = Field(default=None, ge=1)
    max_body_bytes: int | None = Field(default=None, ge=1)
    max_candidates: int | None = Field(default=None, ge=1)
    max_features_per_candidate: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class Limits:
    """What one key may send. ``rate_per_second`` None: no rate limit."""

    max_body_bytes: int
    max_candidates: int
    max_features_per_candidate: int
    rate_per_second: float | None = None
    burst: int = 1


@dataclass(frozen=True)
class Principal:
    """Who is calling: a configured key, or the anonymous caller of a key-less service."""

    name: str
    scopes: frozenset[str]
    policies: frozenset[str] | None  # None: every policy
    limits: Limits
    anonymous: bool = False

    def allows_policy(self, policy: str) -> bool:
        return self.policies is None or policy in self.policies

    def describe_policies(self) -> str:
        return "every policy" if self.policies is None else ", ".join(sorted(self.policies))


def hash_key(key: str) -> str:
    """The stored form of a key: ``sha256:<hex>`` of its UTF-8 bytes."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key() -> str:
    """A new key: 32 random bytes (256 bits), URL-safe, with a recognisable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def entry_toml(entry: Mapping[str, Any]) -> str:
    """A ``[[keys]]`` table for the key file (values are plain strings, numbers, lists)."""
    lines = ["[[keys]]"]
    for name, value in entry.items():
        if value is not None:
            lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; a request takes one token.

    Per process: with N workers or replicas a key may send up to N times its rate overall.
    """

    def __init__(self, rate: float, capacity: int, now: float | None = None) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.updated = time.monotonic() if now is None else now
        self._lock = threading.Lock()

    def take(self, now: float | None = None) -> float:
        """Take a token: 0.0 when admitted, else the seconds until one will be available."""
        with self._lock:
            now = time.monotonic() if now is None else now
            elapsed = max(0.0, now - self.updated)
            self.tokens = min(float(self.capacity), self.tokens + elapsed * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return 0.0
            return (1.0 - self.tokens) / self.rate


def retry_after_header(wait_seconds: float) -> str:
    """``Retry-After`` takes whole seconds (RFC 9110 §10.2.3): round up, at least 1."""
    return str(max(1, math.ceil(wait_seconds)))


@dataclass
class KeyRing:
    """The configured keys of one process, and their rate buckets."""

    defaults: Limits  # the global limits; a key's own can only be narrower
    principals: list[tuple[bytes, Principal]] = field(default_factory=list)
    anonymous: Principal | None = None
    source: str = ""
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    @property
    def configured(self) -> bool:
        return bool(self.principals)

    def authenticate(self, presented: str) -> Principal | None:
        """The principal whose hash matches ``presented``, compared in constant time."""
        if not presented or len(presented) > MAX_KEY_LENGTH:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for stored, principal in self.principals:  # no early exit: same work for every key
            if hmac.compare_digest(digest, stored):
                found = principal
        return found

    def take(self, principal: Principal, now: float | None = None) -> float:
        """Charge one request to the principal's bucket; seconds to wait, 0.0 if admitted."""
        rate = principal.limits.rate_per_second
        if rate is None:
            return 0.0
        bucket = self._buckets.get(principal.name)
        if bucket is None:
            bucket = self._buckets.setdefault(
                principal.name, TokenBucket(rate, principal.limits.burst, now)
            )
        return bucket.take(now)


def global_limits(settings: Settings) -> Limits:
    return Limits(
        max_body_bytes=settings.max_body_bytes,
        max_candidates=settings.max_candidates,
        max_features_per_candidate=settings.max_features_per_candidate,
    )


def _burst(rate: float | None, burst: int | None) -> int:
    if burst is not None:
        return burst
    return max(1, math.ceil(rate)) if rate is not None else 1


def _describe(error: ValidationError, where: str) -> str:
    """Pydantic's message without the offending value (it may be a raw key)."""
    parts = []
    for e in error.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in e.get("loc", ()))
        message = str(e.get("msg", "invalid"))
        if loc.endswith("hash") and e.get("type") == "string_pattern_mismatch":
            message = (
                "must be 'sha256:' and 64 lowercase hex digits: store the hash printed by "
                "`bandit-service keys create` or `keys hash`, never the key itself"
            )
        parts.append(f"{where}{'.' + loc if loc else ''}: {message}")
    return "; ".join(parts)


def parse_entries(data: Any, where: str) -> list[KeyEntry]:
    """Entries from decoded TOML/JSON: a list, or ``{"keys": [...]}``."""
    if isinstance(data, dict):
        extra = sorted(set(data) - {"keys"})
        if extra:
            raise KeyConfigError(f"{where}: unknown top-level key(s) {', '.join(extra)}")
        data = data.get("keys", [])
    if not isinstance(data, list):
        raise KeyConfigError(f"{where}: expected a list of keys or an object with 'keys'")
    entries = []
    for i, raw in enumerate(data):
        if isinstance(raw, dict) and "key" in raw:
            raise KeyConfigError(
                f"{where}.keys[{i}]: has a 'key' field; store only its hash "
                "(`bandit-service keys hash` prints it)"
            )
        try:
            entries.append(KeyEntry.model_validate(raw))
        except ValidationError as exc:
            raise KeyConfigError(_describe(exc, f"{where}.keys[{i}]")) from None
    return entries


def make_entry(key: str, **fields: Any) -> KeyEntry:
    """The key-file entry of ``key`` (only its hash is kept), checked like a loaded one."""
    try:
        return KeyEntry.model_validate({**fields, "hash": hash_key(key)})
    except ValidationError as exc:
        raise KeyConfigError(_describe(exc, "key")) from None


def read_key_file(path: Path) -> list[KeyEntry]:
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyConfigError(f"cannot read BANDIT_API_KEYS_FILE {where}: {exc.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if RAW_KEY.search(line):
            raise KeyConfigError(
                f"{where}: line {number} holds what looks like a raw API key; the key file "
                "must hold only hashes (remove that line)"
            )
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        # The decoder's message locates the problem (line, column) without quoting values.
        raise KeyConfigError(f"{where}: not valid {kind}: {str(exc).splitlines()[0]}") from None
    return parse_entries(data, where)


def read_key_env(text: str) -> list[KeyEntry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyConfigError(f"BANDIT_API_KEYS: not valid JSON: {exc.msg} at {exc.pos}") from None
    return parse_entries(data, "BANDIT_API_KEYS")


def _narrow(name: str, field_name: str, value: int | None, ceiling: int, env: str) -> int:
    if value is None:
        return ceiling
    if value > ceiling:
        raise KeyConfigError(
            f"key {name!r}: {field_name} {value} exceeds the global {env} {ceiling}; "
            "a key can only narrow the global limits"
        )
    return value


def build_keyring(
    settings: Settings,
    entries: Sequence[KeyEntry],
    known_policies: Iterable[str] | None = None,
    source: str = "",
) -> KeyRing:
    """Check entries against each other, the global limits and the known policies."""
    base = global_limits(settings)
    known = set(known_policies) if known_policies is not None else None
    ring = KeyRing(defaults=base, source=source)
    names: set[str] = set()
    hashes: set[str] = set()
    for entry in entries:
        if entry.name in names:
            raise KeyConfigError(f"key name {entry.name!r} is configured twice")
        if entry.hash in hashes:
            raise KeyConfigError(f"key {entry.name!r} has the same hash as another key")
        names.add(entry.name)
        hashes.add(entry.hash)
        if known is not None and entry.policies is not None:
            unknown = sorted(set(entry.policies) - known)
            if unknown:
                raise KeyConfigError(
                    f"key {entry.name!r}: unknown policy {', '.join(unknown)} "
                    f"(known: {', '.join(sorted(known))})"
                )
        rate = entry.rate_per_second or settings.key_rate_per_second
        limits = Limits(
            max_body_bytes=_narrow(entry.name, "max_body_bytes", entry.max_body_bytes,
                                   base.max_body_bytes, "BANDIT_MAX_BODY_BYTES"),
            max_candidates=_narrow(entry.name, "max_candidates", entry.max_candidates,
                                   base.max_candidates, "BANDIT_MAX_CANDIDATES"),
            max_features_per_candidate=_narrow(
                entry.name, "max_features_per_candidate", entry.max_features_per_candidate,
                base.max_features_per_candidate, "BANDIT_MAX_FEATURES_PER_CANDIDATE",
            ),
            rate_per_second=rate,
            burst=_burst(rate, entry.burst or settings.key_rate_burst),
        )  # fmt: skip
        principal = Principal(
            name=entry.name,
            scopes=frozenset(entry.scopes),
            policies=frozenset(entry.policies) if entry.policies is not None else None,
            limits=limits,
        )
        ring.principals.append((bytes.fromhex(entry.hash[len(HASH_PREFIX) :]), principal))
    if not ring.principals:
        ring.anonymous = Principal(
            name="anonymous (no API keys configured)",
            scopes=frozenset(SCOPES),
            policies=None,
            limits=base,
            anonymous=True,
        )
    return ring


def load_keyring(settings: Settings, known_policies: Iterable[str] | None = None) -> KeyRing:
    """The keys ``settings`` points at (file and/or inline JSON); none: an open keyring."""
    entries: list[KeyEntry] = []
    sources = []
    if settings.api_keys_file is not None:
        entries += read_key_file(settings.api_keys_file)
        sources.append(str(settings.api_keys_file))
    if settings.api_keys:
        entries += read_key_env(settings.api_keys)
        sources.append("BANDIT_API_KEYS")
    if sources and not entries:
        raise KeyConfigError(
            f"{' and '.join(sources)} configured but holding no keys; remove the setting "
            "to serve on loopback without keys, or add a key (`bandit-service keys create`)"
        )
    return build_keyring(settings, entries, known_policies, " and ".join(sources))


LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual names of loopback; 0.0.0.0 is not."""
    import ipaddress

    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
