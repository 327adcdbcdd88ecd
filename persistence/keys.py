"""API keys: generation, hashing and creation (the secret is shown once, only its hash is kept)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from persistence.db import utcnow
from persistence.models import ApiKey, User

KEY_PREFIX = "ssql_"


def hash_key(key: str) -> str:
    """sha256 is enough for a 256-bit random secret (no dictionary to attack)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(session: Session, user_name: str) -> str:
    """Create ``user_name`` if needed, attach a new key to it and return the secret."""
    user = session.scalar(select(User).where(User.name == user_name))
    now = utcnow()
    if user is None:
        user = User(name=user_name, created_at=now)
        session.add(user)
        session.flush()
    key = new_key()
    session.add(ApiKey(user_id=user.id, key_hash=hash_key(key), prefix=key[:12], created_at=now))
    session.commit()
    return key
