"""Secret: a string that never prints (STYLE.md rule 9)."""

from __future__ import annotations

from typing import Final

REDACTED: Final = "********"


class Secret:
    """Holds a secret value. `str()`, `repr()` and f-strings show `********`; `reveal()` gives the value.

    Equality compares values so that records holding secrets stay comparable; hashing is by value too.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one call that must hand it to a target or initiator."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)
