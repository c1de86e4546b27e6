"""The API_KEYS_FILE format and segmentctl's key maker."""

from __future__ import annotations

import hashlib

import pytest
from typer.testing import CliRunner

from segmentctl.cli import app
from shared.api_keys import ApiKey, KeyFileError, key_hash, new_key, parse_keys

DIGEST = "a" * 64


def test_lines_comments_and_blank_lines():
    text = (f"# the keys of the checkout team\n\ncheckout:read,status:{DIGEST}  # since 2026-11\n"
            f"billing:write:{'B' * 64}\n")
    assert parse_keys(text) == {DIGEST: ApiKey("checkout", frozenset({"read", "status"})),
                                "b" * 64: ApiKey("billing", frozenset({"write"}))}


@pytest.mark.parametrize(("line", "reason"), [
    ("checkout:read", "expected <name>:<scope>"),
    (f"checkout:admin:{DIGEST}", "unknown scope admin"),
    (f"check out:read:{DIGEST}", "a key's name"),
    ("checkout:read:my-secret-key", "SHA-256 as 64 hex digits, not the key"),
])
def test_a_bad_line_is_refused_with_its_number(line, reason):
    with pytest.raises(KeyFileError, match=rf"line 2: .*{reason}"):
        parse_keys(f"# ok\n{line}\n")


def test_a_new_key_and_its_line_match_and_the_line_holds_no_key():
    key, line = new_key("checkout", ["read", "status"])
    assert key not in line and line.endswith(hashlib.sha256(key.encode()).hexdigest())
    assert parse_keys(line) == {key_hash(key): ApiKey("checkout", frozenset({"read", "status"}))}
    assert new_key("checkout", ["read"])[0] != key


def test_segmentctl_keys_create_prints_the_key_and_the_line():
    result = CliRunner().invoke(app, ["keys", "create", "--name", "checkout", "--scopes", "read,write"])
    assert result.exit_code == 0, result.output
    key = result.output.split("key:", 1)[1].split()[0]
    line = result.output.split("line:", 1)[1].split()[0]
    assert parse_keys(line) == {key_hash(key): ApiKey("checkout", frozenset({"read", "write"}))}
    refused = CliRunner().invoke(app, ["keys", "create", "--name", "x", "--scopes", "admin"])
    assert refused.exit_code == 2 and "unknown scope admin" in refused.output
