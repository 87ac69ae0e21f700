"""Credentials for the Auth0 webhook and the admin API, compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable


def _raw(header: str) -> bytes | None:
    # WSGI hands headers over as latin-1 text; their bytes are what the client sent.
    try:
        return header.encode("latin-1")
    except UnicodeEncodeError:
        return None


def presented_secret(authorization: str | None) -> bytes | None:
    """The secret in ``Authorization: Bearer <t>`` or in HTTP Basic's password."""
    raw = _raw(authorization or "")
    if not raw:
        return None
    scheme, _, value = raw.strip().partition(b" ")
    value = value.strip()
    if scheme.lower() == b"bearer":
        return value or None
    if scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        _user, separator, password = decoded.partition(b":")
        return password if separator and password else None
    return None


def secret_matches(presented: bytes | None, valid: Iterable[str]) -> bool:
    """Whether ``presented`` equals one of the ``valid`` secrets (each compared in full)."""
    if presented is None:
        return False
    matched = False
    for secret in valid:
        # Compare against every token, so timing does not tell which one matched.
        matched |= hmac.compare_digest(presented, secret.encode("utf-8"))
    return matched
