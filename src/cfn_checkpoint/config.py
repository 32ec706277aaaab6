"""Where the tiers are: URLs from arguments first, then the environment, then defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import ValidationError

#: The durable store used when neither an argument nor ``CFN_DURABLE_URL`` names one.
DEFAULT_DURABLE_URL = "sqlite:///cfn-checkpoint.db"


def redis_url_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``CFN_REDIS_URL``, else ``CFN_REDIS_HOST``/``CFN_REDIS_PORT``, else ``None`` (embedded)."""
    env = os.environ if env is None else env
    url = env.get("CFN_REDIS_URL", "").strip()
    if url:
        return url
    host = env.get("CFN_REDIS_HOST", "").strip()
    port = env.get("CFN_REDIS_PORT", "").strip()
    if not host and not port:
        return None
    if port and not port.isdigit():
        raise ValidationError(f"CFN_REDIS_PORT must be a port number, not {port!r}")
    return f"redis://{host or '127.0.0.1'}:{port or '6379'}/0"


def durable_url_from_env(env: Mapping[str, str] | None = None) -> str:
    """``CFN_DURABLE_URL``, else :data:`DEFAULT_DURABLE_URL`."""
    env = os.environ if env is None else env
    return env.get("CFN_DURABLE_URL", "").strip() or DEFAULT_DURABLE_URL
