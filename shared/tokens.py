"""API tokens stored in the database (``ebb tokens create``) and token hashing.

Only the SHA-256 of a token is ever stored; tokens are compared by hash. The
environment tokens (``EBB_API_TOKENS``, see :func:`shared.settings.parse_api_tokens`)
and the database tokens work side by side.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import ApiToken
from shared.settings import valid_owner_name

#: Bytes of randomness in a new token (encoded as URL-safe base64, 43 characters).
TOKEN_BYTES = 32


def token_sha256(token: str) -> str:
    """Hex SHA-256 of a token (UTF-8; invalid characters replaced)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def new_token() -> str:
    """A fresh random token, prefixed ``ebb_`` so it is recognisable in a leak scan."""
    return "ebb_" + secrets.token_urlsafe(TOKEN_BYTES)


def create_token(db: Session, name: str, admin: bool = False) -> str:
    """Store the hash of a new token for owner ``name`` and return the token (shown once).

    Raises ValueError for an invalid name (1-64 characters of letters, digits,
    ``_ . @ -``).
    """
    if not valid_owner_name(name):
        raise ValueError("the name must be 1-64 characters of letters, digits, '_', '.', '@' or '-'")
    token = new_token()
    db.add(ApiToken(name=name, token_sha256=token_sha256(token), admin=bool(admin)))
    db.commit()
    return token


def find_token(db: Session, sha256_hex: str) -> ApiToken | None:
    """The database token whose hash is ``sha256_hex``, if any."""
    return db.scalar(select(ApiToken).where(ApiToken.token_sha256 == sha256_hex))


def any_tokens(db: Session) -> bool:
    """True when at least one token was made with ``ebb tokens create``."""
    return db.scalar(select(ApiToken.id).limit(1)) is not None
