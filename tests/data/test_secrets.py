"""Secrets are replaced, line numbers kept, and ordinary strings left alone."""

from __future__ import annotations

import pytest

from moetune.data.secrets import REDACTED, is_secret_file_name, looks_like_secret, redact_secrets


def test_private_key_block_is_redacted_and_line_count_kept():
    text = 'let k = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAx\nQ2ZbGx\n-----END RSA PRIVATE KEY-----";\nnext();\n'
    redacted, counts = redact_secrets(text)
    assert redacted == f'let k = "{REDACTED}\n\n\n";\nnext();\n'
    assert dict(counts) == {"private_key": 1}


@pytest.mark.parametrize("line, kind", [
    ('let id = "AKIAIOSFODNN7EXAMPLE";', "aws_access_key"),
    ('let t = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";', "github_token"),
    ('let k = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";', "stripe_key"),
    ('let api_key = "a8f5f167f44f4964e6c998dee827110c";', "assigned_secret"),
    ('const DB_PASSWORD: &str = "Xk9#mP2$vL7qR4wZ";', "assigned_secret"),
    ('headers.insert(AUTHORIZATION, "Bearer eyJhbGciOiJIUzI1NiJ9x7");', "assigned_secret"),
])
def test_shaped_and_assigned_secrets_are_redacted(line: str, kind: str):
    redacted, counts = redact_secrets(line)
    assert dict(counts) == {kind: 1}
    assert REDACTED in redacted
    assert redacted.count("\n") == line.count("\n")


@pytest.mark.parametrize("line", [
    'let msg = "token must not be empty, try again";',  # a sentence, not a key
    'let token = "aaaaaaaaaaaaaaaaaaaaaaaa";',  # long but no entropy
    'let name = "a8f5f167f44f4964e6c998dee827110c";',  # random but not assigned to a secret-like name
    'let t = Token::new("abcdefghij0123456789");',  # `::` is a path, not an assignment
    'let api_key = "short1";',
])
def test_ordinary_strings_are_left_alone(line: str):
    assert redact_secrets(line) == (line, {})


def test_secret_file_names_and_entropy_rule():
    assert all(map(is_secret_file_name, [".env", ".env.production", "server.pem", "tls.key", "id_rsa", "id_ed25519.pub"]))
    assert not any(map(is_secret_file_name, ["lib.rs", "env.rs", "keys.rs", "Cargo.toml"]))
    assert looks_like_secret("9f86d081884c7d659a2feaa0c55ad015")
    assert not looks_like_secret("DATABASE_CONNECTION_TIMEOUT")
