"""API keys: generation, hashing, creation and revocation (the secret is shown once, only its hash is kept).

Revocation and the API's auth cache (docs/decisions/011, 014): on Postgres a trigger on
``api_keys`` (migration 0004) sends ``NOTIFY ssql_key_revoked, '<key hash>'`` in the transaction
of any change of a key (``revoked_at`` set by this module, the API or an operator's own
``UPDATE``; a ``DELETE``, also cascaded from ``users``; ``'*'`` for a ``TRUNCATE``); every API
process listens on that channel and drops the key from its cache when the notification arrives
(milliseconds). Without a listener (SQLite, or the listening connection lost) cached keys live
at most ``min(SSQL_AUTH_CACHE_SECONDS, 1)`` seconds.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from persistence.db import utcnow
from persistence.models import ApiKey, User

KEY_PREFIX = "ssql_"
#: Postgres NOTIFY channel of revocations; the payload is the revoked key's hash
REVOKED_CHANNEL = "ssql_key_revoked"


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


def revoke_keys(session: Session, *, key: str | None = None, prefix: str | None = None, user_name: str | None = None) -> list[str]:
    """Revoke the key given in full, the key(s) whose shown prefix is ``prefix``, or every key of
    ``user_name`` (exactly one selector); returns the hashes revoked (already revoked ones are not).

    Commits, and on Postgres notifies the API processes (:data:`REVOKED_CHANNEL`) in the same
    transaction so their auth caches forget the keys at once."""
    if sum(x is not None for x in (key, prefix, user_name)) != 1:
        raise ValueError("give exactly one of key, prefix, user_name")
    where = [ApiKey.revoked_at.is_(None)]
    if key is not None:
        where.append(ApiKey.key_hash == hash_key(key))
    elif prefix is not None:
        if len(prefix) < len(KEY_PREFIX) + 4:
            raise ValueError(f"a prefix names a key by at least {len(KEY_PREFIX) + 4} characters, e.g. ssql_AbCd")
        where.append(ApiKey.prefix.startswith(prefix, autoescape=True) if len(prefix) < 12 else ApiKey.prefix == prefix[:12])
    else:
        where.append(ApiKey.user_id.in_(select(User.id).where(User.name == user_name)))
    hashes = list(session.scalars(update(ApiKey).where(*where).values(revoked_at=utcnow()).returning(ApiKey.key_hash)))
    session.commit()  # the table's trigger notified the API processes (migration 0004)
    return hashes


def list_keys(session: Session, user_name: str | None = None) -> list[dict[str, object]]:
    """Keys (never their secrets): user, prefix, created_at, revoked_at."""
    stmt = select(User.name, ApiKey.prefix, ApiKey.created_at, ApiKey.revoked_at).join(User, User.id == ApiKey.user_id)
    if user_name is not None:
        stmt = stmt.where(User.name == user_name)
    return [dict(r._mapping) for r in session.execute(stmt.order_by(ApiKey.id))]
