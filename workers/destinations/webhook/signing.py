"""Standard Webhooks signatures: HMAC-SHA256 over ``{id}.{timestamp}.{body}``, base64, ``v1,``.

The body is signed as the exact bytes sent: serialise once, sign those bytes,
send those bytes. One signature per secret, space-separated, so that during a
rotation a receiver that knows either secret accepts the message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def signature_header(keys: Iterable[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64>`` for each key, space-separated."""
    if "." in message_id:
        raise ValueError("a webhook id must not contain '.': it delimits the signed content")
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def safe_id_part(text: str) -> str:
    """``text`` with every character that is not a letter, digit, ``_`` or ``-`` made ``_``.

    The id is signed between full stops, so it must hold none; keeping to this
    small alphabet also keeps it a plain header value.
    """
    return _UNSAFE.sub("_", text)
