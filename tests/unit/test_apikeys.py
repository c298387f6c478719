"""API-key configuration, lookup and the token bucket, without HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bandit_service.apikeys import (
    KeyConfigError,
    TokenBucket,
    build_keyring,
    create_key,
    hash_key,
    is_loopback,
    load_keyring,
    make_entry,
    read_key_file,
    retry_after_header,
)
from bandit_service.config import Settings


def test_hash_format_and_fresh_keys() -> None:
    assert hash_key("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )  # SHA-256("abc"), FIPS 180-2 appendix B.1
    keys = {create_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("bsk_") and len(k) >= 4 + 43 for k in keys)  # 256 bits


def test_authenticate_finds_exactly_the_matching_key() -> None:
    settings = Settings()
    raw = [create_key() for _ in range(3)]
    entries = [make_entry(k, name=f"k{i}", scopes=["read"]) for i, k in enumerate(raw)]
    ring = build_keyring(settings, entries)
    for i, key in enumerate(raw):
        found = ring.authenticate(key)
        assert found is not None and found.name == f"k{i}"
    assert ring.authenticate(raw[0][:-1]) is None
    assert ring.authenticate(raw[0] + "x") is None
    assert ring.authenticate("") is None
    assert ring.authenticate(entries[0].hash) is None  # the hash is not the key
    assert ring.authenticate("x" * 100_000) is None
    assert ring.anonymous is None and ring.configured


def test_no_keys_means_an_anonymous_principal_with_the_global_limits() -> None:
    settings = Settings(max_candidates=7)
    ring = load_keyring(settings)
    assert not ring.configured and ring.anonymous is not None
    assert ring.anonymous.scopes == {"decide", "read", "admin"}
    assert ring.anonymous.limits.max_candidates == 7
    assert ring.anonymous.limits.rate_per_second is None


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # one token takes 1/rate seconds
    assert bucket.take(100.25) == pytest.approx(0.25)  # half refilled
    assert bucket.take(100.5) == 0.0
    assert bucket.take(110.0) == 0.0  # refills up to its capacity, not beyond
    assert bucket.take(110.0) == 0.0
    assert bucket.take(110.0) == 0.0
    assert bucket.take(110.0) > 0.0
    assert retry_after_header(0.01) == "1" and retry_after_header(2.2) == "3"


def test_rate_and_burst_defaults(tmp_path: Path) -> None:
    key = create_key()
    settings = Settings(key_rate_per_second=2.5)
    ring = build_keyring(settings, [make_entry(key, name="k", scopes=["read"])])
    principal = ring.authenticate(key)
    assert principal is not None
    assert principal.limits.rate_per_second == 2.5 and principal.limits.burst == 3
    assert [ring.take(principal, now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert ring.take(principal, now=0.0) == pytest.approx(0.4)


def test_toml_and_json_files_configure_the_same_keys(tmp_path: Path) -> None:
    key = create_key()
    toml_file = tmp_path / "keys.toml"
    toml_file.write_text(
        f'[[keys]]\nname = "web"\nhash = "{hash_key(key)}"\nscopes = ["decide"]\n'
        'policies = ["default"]\nrate_per_second = 5\n'
    )
    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps({"keys": [
        {"name": "web", "hash": hash_key(key), "scopes": ["decide"], "policies": ["default"],
         "rate_per_second": 5}
    ]}))  # fmt: skip
    assert read_key_file(toml_file) == read_key_file(json_file)
    ring = load_keyring(Settings(api_keys_file=toml_file), known_policies=["default"])
    principal = ring.authenticate(key)
    assert principal is not None and principal.policies == {"default"}
    assert principal.limits.rate_per_second == 5 and principal.limits.burst == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"name": "a", "hash": "RAWSECRET", "scopes": ["read"]}]', "never the key itself"),
        ('[{"name": "a", "key": "RAWSECRET", "scopes": ["read"]}]', "store only its hash"),
        ('[{"name": "a", "hash": "HASH", "scopes": ["root"]}]', "scopes.0"),
        ('[{"name": "a", "hash": "HASH", "scopes": []}]', "scopes"),
        ('[{"name": "a", "hash": "HASH", "scopes": ["read"], "rate": 1}]', "rate"),
        ('[{"name": "a", "hash": "HASH", "scopes": ["read"], "burst": 0}]', "burst"),
        ('{"kees": []}', "unknown top-level"),
        ('{"name": "a"', "not valid JSON"),
        (
            '[{"name": "a", "hash": "HASH", "scopes": ["read"]},'
            ' {"name": "a", "hash": "HASH2", "scopes": ["read"]}]',
            "configured twice",
        ),
        (
            '[{"name": "a", "hash": "HASH", "scopes": ["read"]},'
            ' {"name": "b", "hash": "HASH", "scopes": ["read"]}]',
            "same hash",
        ),
        ('[{"name": "a", "hash": "HASH", "scopes": ["read"], "max_body_bytes": 1e9}]', "narrow"),
    ],
)
def test_bad_configuration_is_refused_without_echoing_values(content: str, message: str) -> None:
    content = content.replace('"HASH2"', json.dumps(hash_key("other")))
    content = content.replace('"HASH"', json.dumps(hash_key("k")))
    with pytest.raises(KeyConfigError, match=message) as info:
        load_keyring(Settings(api_keys=content))
    assert "RAWSECRET" not in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="cannot read BANDIT_API_KEYS_FILE"):
        load_keyring(Settings(api_keys_file=tmp_path / "missing.toml"))
    bad = tmp_path / "keys.toml"
    bad.write_text("[[keys]\n")
    with pytest.raises(KeyConfigError, match="not valid TOML"):
        load_keyring(Settings(api_keys_file=bad))


def test_a_raw_key_in_the_key_file_is_refused(tmp_path: Path) -> None:
    key = create_key()
    key_file = tmp_path / "keys.toml"
    key_file.write_text(
        f'# the key: {key}\n[[keys]]\nname = "w"\nhash = "{hash_key(key)}"\nscopes = ["read"]\n'
    )
    with pytest.raises(KeyConfigError, match="line 1 holds what looks like a raw API key") as info:
        load_keyring(Settings(api_keys_file=key_file))
    assert key not in str(info.value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
