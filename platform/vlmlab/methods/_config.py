"""The one configuration a method has: the spec's ``method`` section, validated.

Each method declares its settings once, as a :class:`MethodConfig` subclass
beside its loop: the fields, their defaults, their checks and their docs. A
task's method spec *is* that class (``Task.method_spec``), so a YAML key, the
value the method reads and the check that guards it cannot drift apart. What a
trial adds that the spec's method section does not hold (the query budget, the
prompt's words) goes to the method's constructor, never into the config.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol, Self, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict

__all__ = [
    "CropArea",
    "MethodConfig",
    "PopulationSearch",
    "Settings",
    "config_changes",
]


class Settings(BaseModel):
    """A section of settings: unknown keys are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def record(self) -> dict[str, Any]:
        """The settings as plain values, as checkpoints store them to refuse a foreign resume."""
        return self.model_dump()

    def replaced(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated again (``model_copy`` would not check them)."""
        return self.model_validate({**self.model_dump(), **changes})


class MethodConfig(Settings):
    """A method's settings. ``name`` tells a method's variants apart; a subclass narrows
    it to a ``Literal`` of its variants, the default being its main one."""

    name: str


@runtime_checkable
class PopulationSearch(Protocol):
    """A config whose method asks ``popsize`` candidates a generation for at most
    ``iterations`` generations: what the generic budget arithmetic reads
    (:meth:`vlmlab.tasks.Task.generations`); other methods' tasks say their own."""

    popsize: int
    iterations: int


def check_crop_area(value: tuple[float, float]) -> tuple[float, float]:
    """A random resized crop's area range: ``0 < low <= high <= 1``."""
    low, high = value
    if not 0 < low <= high <= 1:
        raise ValueError(
            f"must satisfy 0 < low <= high <= 1 (a share of the image's area), got {value}"
        )
    return value


CropArea = Annotated[tuple[float, float], AfterValidator(check_crop_area)]
"""A random resized crop's ``(low, high)`` share of the image's area."""


def config_changes(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """The settings in which a checkpoint's ``saved`` record differs from ``ours``.

    Checkpoints written before the settings were declared once named the variant
    ``variant`` (``name`` now); such a record is compared field by field with the
    variant matched by either key.
    """
    saved = dict(saved)
    legacy = saved.pop("variant", None)
    if legacy is not None and "name" not in saved:
        # An old safe_bbf record said "bbf": the variant its search used.
        if legacy == ours.get("name") or (ours.get("name") == "safe_bbf" and legacy == "bbf"):
            saved["name"] = ours.get("name")
        else:
            saved["name"] = legacy
    keys = saved.keys() | ours.keys()
    return sorted(k for k in keys if _plain(saved.get(k)) != _plain(ours.get(k)))


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (a record may have passed through JSON)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
