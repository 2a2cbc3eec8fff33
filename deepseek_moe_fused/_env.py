"""Implementation choices read from environment variables (per call), and a scoped override."""

from __future__ import annotations

import contextlib
import os


def env_choice(name: str, allowed: tuple[str, ...], default: str) -> str:
    """The value of `name`, which must be one of `allowed`; `default` when unset or empty."""
    value = os.environ.get(name, default).strip() or default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


@contextlib.contextmanager
def env_set(name: str, value: str):
    """Set `name` to `value` inside the block; restored (or removed) afterwards."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
