"""Keep credentials out of the dataset.

Two layers: files that are credentials by name (``.env``, keys, certificates) are never read, and
every source text is scrubbed before it is parsed, so no sample (file-level, per-item or
instruction) can carry a secret. A redaction keeps the line count unchanged, so reported line
numbers still match the original file.
"""

from __future__ import annotations

import math
import re
from collections import Counter

REDACTED = "<REDACTED>"

_SECRET_FILE_SUFFIXES = (".pem", ".key", ".p12", ".pfx", ".crt", ".cer", ".der", ".jks", ".keystore", ".kdbx", ".gpg", ".asc")
_SECRET_FILE_NAMES = frozenset({".env", ".netrc", ".pgpass", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "credentials"})

_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    # Up to the END line; an unterminated block runs to the first line that is not base64-like.
    r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|(?:[^\n]*\n?)(?:[ \t]*[A-Za-z0-9+/=:\\\"-]+[ \t]*\n)*)"
)
# Cloud and SaaS credentials with a recognisable shape, each with the literal prefixes it can start
# with: a substring test (C speed) decides whether the regex needs to run at all.
_KEY_SHAPES = {
    "aws_access_key": (("AKIA", "ASIA", "ABIA", "ACCA"), re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")),
    "github_token": (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    "slack_token": (("xox",), re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b")),
    "google_api_key": (("AIza",), re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    "stripe_key": (("k_live_", "k_test_"), re.compile(r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{16,}\b")),
}
# A long string literal without spaces (optionally after an auth scheme), found first because it is
# rare; only then is the line checked for a credential-like name assigned to it.
_LONG_LITERAL = re.compile(r'"((?:Bearer |Basic |Token )?[^"\\\s]{16,})"')
_SECRET_NAME = re.compile(r"(?i)api[_-]?key|secret|token|passw(?:or)?d|pwd|access[_-]?key|private[_-]?key|credential|auth")
_ASSIGNMENT = re.compile(r"=|(?<!:):(?!:)")  # `::` is a path, not an assignment
MIN_SECRET_LENGTH = 16
# Random base64/hex keys sit around 4-6 bits per character; words and identifiers sit lower.
MIN_SECRET_ENTROPY = 3.5


def is_secret_file_name(name: str) -> bool:
    """True for files that hold credentials by convention and are never read."""
    lower = name.lower()
    return (lower in _SECRET_FILE_NAMES or lower.startswith(".env.") or lower.endswith(_SECRET_FILE_SUFFIXES)
            or lower.startswith(("id_rsa", "id_ed25519", "id_ecdsa", "id_dsa")))


def redact_secrets(text: str) -> tuple[str, Counter]:
    """Replace private keys, shaped cloud keys and high-entropy assigned secrets with a placeholder.

    Returns the scrubbed text and the number of redactions by kind. Line count is preserved.
    """
    counts: Counter = Counter()
    if "PRIVATE KEY" in text:
        text = _PRIVATE_KEY_BLOCK.sub(lambda m: _count(counts, "private_key", _keep_newlines(m.group(0))), text)
    for kind, (prefixes, pattern) in _KEY_SHAPES.items():
        if any(prefix in text for prefix in prefixes):
            text = pattern.sub(lambda m, kind=kind: _count(counts, kind, REDACTED), text)
    if '"' in text:
        text = _LONG_LITERAL.sub(lambda m: _redact_if_assigned_secret(m, text, counts), text)
    return text, counts


def shannon_entropy(value: str) -> float:
    """Bits per character of ``value``'s character distribution."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def looks_like_secret(value: str) -> bool:
    """A long, mixed letters-and-digits, high-entropy token with no spaces: a key, not a sentence."""
    return (len(value) >= MIN_SECRET_LENGTH and not any(ch.isspace() for ch in value)
            and any(ch.isdigit() for ch in value) and any(ch.isalpha() for ch in value)
            and shannon_entropy(value) >= MIN_SECRET_ENTROPY)


def _redact_if_assigned_secret(match: re.Match, text: str, counts: Counter) -> str:
    """The literal itself, or the literal with its secret word replaced when a credential-like
    name is assigned to it on the same line (``api_key = "..."``, ``password: "..."``) or it
    carries an auth scheme (``"Bearer ..."``)."""
    literal = match.group(1)
    word = literal.rpartition(" ")[2]
    line_start = text.rfind("\n", 0, match.start()) + 1
    before = text[line_start:match.start()]
    name = _SECRET_NAME.search(before)
    assigned = name is not None and _ASSIGNMENT.search(before, name.end()) is not None
    # "Bearer <token>" is a credential wherever it is written, assigned or passed as an argument.
    if not (assigned or word != literal) or not looks_like_secret(word):
        return match.group(0)
    counts["assigned_secret"] += 1
    return '"' + literal[:len(literal) - len(word)] + REDACTED + '"'


def _keep_newlines(block: str) -> str:
    return REDACTED + "\n" * block.count("\n")


def _count(counts: Counter, kind: str, replacement: str) -> str:
    counts[kind] += 1
    return replacement
