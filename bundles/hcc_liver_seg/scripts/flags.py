"""Command-line values for boolean ids.

``python -m monai.bundle run --resume false`` passes the *string* ``'false'`` (fire only turns
``False``/``True`` into booleans), and a non-empty string is truthy, so every boolean id of the
configs goes through :func:`as_bool` where it is used.
"""

from __future__ import annotations

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "none", ""}


def as_bool(value, name: str = "flag") -> bool:
    """``True``/``False`` for a boolean id given as a bool, 0/1 or one of true/false/yes/no/on/off
    (any case); anything else is an error that names the id, rather than a silent truthy value."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}: expected true/false (or 1/0); got {value!r}")
