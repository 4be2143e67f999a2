"""plain(): a log call's values made into what an event's `data` can carry.

Log records and structlog event dicts hold whatever the caller passed: datetimes,
exceptions, ORM objects, cycles. An event's `data` must encode as MessagePack and read
back as JSON, so anything else is replaced by its repr(), at log time (the object may
change or be gone by the time the sender thread encodes it).
"""

from __future__ import annotations

from typing import Any

# The daemon refuses data nested deeper than 64; an event holds data under a few keys
# of its own, and a record this deep is a cycle or a mistake more often than a payload.
MAX_DEPTH = 32
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what MessagePack can carry


_SCALARS = frozenset({str, float, bool, type(None)})


def plain(value: Any, depth: int = 0) -> Any:
    """`value` if it is None, bool, int (64-bit), float or str; lists, tuples and dicts
    made plain item by item (dict keys as str); anything else as its repr()."""
    kind = type(value)
    # Exact types first: this runs on every log call, and a set lookup is about half
    # the cost of isinstance() with a union; subclasses take the longer way below.
    if kind in _SCALARS:
        return value
    if kind is dict and depth < MAX_DEPTH:
        return {key if type(key) is str else safe_repr(key): plain(item, depth + 1)
                for key, item in value.items()}
    # Subclasses (StrEnum, a str or float of a library's own) as their base type's value:
    # msgspec refuses a plain subclass, and its own __str__ may say something else.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value) if _INT_MIN <= value <= _INT_MAX else safe_repr(value)
    if depth < MAX_DEPTH:
        if isinstance(value, dict):
            return {key if isinstance(key, str) else safe_repr(key): plain(item, depth + 1)
                    for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [plain(item, depth + 1) for item in value]
    return safe_repr(value)


def safe_repr(value: Any) -> str:
    """repr(), or a placeholder when the object's own __repr__ raises."""
    try:
        return repr(value)
    except Exception:  # a broken __repr__ must not cost the record
        return f"<unrepresentable {type(value).__qualname__}>"


def plain_str(value: Any) -> str:
    """`value` if it is a str, else its str() (or repr() should str() raise)."""
    if isinstance(value, str):
        return str.__str__(value)  # an exact str: msgspec refuses subclasses
    try:
        return str(value)
    except Exception:  # as safe_repr: the record is kept, with what can be said of it
        return safe_repr(value)


def checked_tags(tags: dict[str, str] | None, owner: str) -> dict[str, str] | None:
    """`tags` as the daemon accepts them (protocol.md), else ValueError naming `owner`:
    at most 32, keys of 1..64 and values of at most 256 characters, all str."""
    if tags is None:
        return None
    if not isinstance(tags, dict) or len(tags) > 32:
        raise ValueError(f"{owner} tags: expected a dict of at most 32 str -> str")
    for key, value in tags.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise ValueError(f"{owner} tags: key {key!r} is not a str of 1..64 characters")
        if not isinstance(value, str) or len(value) > 256:
            raise ValueError(f"{owner} tags[{key!r}]: expected a str of at most 256 "
                             "characters")
    return {str.__str__(key): str.__str__(value) for key, value in tags.items()}


def without_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (a file name decoded with
    surrogateescape, say) written as a backslash escape: UTF-8 cannot carry them."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {without_surrogates(key): without_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_surrogates(item) for item in value]
    return value
