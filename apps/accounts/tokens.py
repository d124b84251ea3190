"""Random bearer tokens and their stored form.

Tokens carry 256 random bits, so a single SHA-256 is enough to store them: a
slow password hash protects guessable secrets, which these are not.
"""

from __future__ import annotations

import hashlib
import secrets


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
