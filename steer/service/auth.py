"""The bearer token both front ends check (gRPC ``authorization`` metadata, HTTP
``Authorization`` header: SillyTavern sends its API key there)."""

from __future__ import annotations

import hmac


def bearer_matches(given: str, token: str) -> bool:
    """Whether the header value ``given`` is ``Bearer <token>`` (compared in constant time)."""
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
