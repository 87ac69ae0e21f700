"""Property maps every destination shares: which Auth0 field goes to which name.

A map is a JSON object ``{"auth0_field": "destination_name"}``; dotted fields
(``app_metadata.plan``) reach into nested objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_property_map(path: str | None, default: dict[str, str], variable: str) -> dict[str, str]:
    """The map in the JSON file at ``path`` (``variable`` names it in errors), or ``default``."""
    if not path:
        return dict(default)
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{variable} {path!r} is not a readable JSON file: {error}") from None
    pairs = list(mapping.items()) if isinstance(mapping, dict) else []
    if not pairs or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in pairs
    ):
        example = '{"given_name": "first_name", "app_metadata.plan": "plan"}'
        raise ValueError(f"{variable} {path!r} must hold a JSON object of names like {example}")
    return mapping


def profile_field(profile: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of an Auth0 user (None when absent)."""
    value: Any = profile
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
