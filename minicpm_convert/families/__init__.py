"""The model families, one module each, registered by what their config.json says.

    family_for_config(cfg)  -> the family of a checkpoint (ConvertError for unknown ones)
    family_of(spec)         -> the family a spec was parsed by
    family_for_gguf(fields) -> the family that reads a GGUF architecture back
    check(spec, command)    -> refuse (ConvertError) or return the warnings of a command
    support_matrix()        -> the README's variants table

A new family is a new module here (a `Family` subclass decorated with `@register`) plus its
fixture; nothing outside this package asks which family it is handling.
"""

from __future__ import annotations

from ..errors import ConvertError
from .base import COMMANDS, Family, GgufFields

_REGISTRY: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    _REGISTRY[cls.name] = cls()
    return cls


def families() -> list[Family]:
    return list(_REGISTRY.values())


def family_for_config(cfg: dict, where: str = "config.json") -> Family:
    found = [f for f in _REGISTRY.values() if f.matches(cfg)]
    if not found:
        known = sorted({t for f in _REGISTRY.values() for t in f.model_types})
        raise ConvertError(f"{where}: unknown model_type {cfg.get('model_type')!r} "
                           f"(supported: {', '.join(repr(k) for k in known)})")
    # A refusal by name wins (a draft head may say model_type llama), then a specialisation
    # (MiniCPM-S of MiniCPM) over the family it refines.
    return max(found, key=lambda f: (isinstance(f, RefusedByConfig), len(type(f).__mro__)))


def family_of(spec) -> Family:
    return _REGISTRY[spec.family]


def expected_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `spec` holds, in canonical order, with its shape."""
    return family_of(spec).expected_shapes(spec)


def family_for_gguf(fields: GgufFields) -> Family:
    found = [f for f in _REGISTRY.values() if fields.arch in f.gguf_archs and f.gguf_matches(fields)]
    if not found:
        archs = sorted({a for f in _REGISTRY.values() for a in f.gguf_archs})
        raise ConvertError(f"{fields.path}: architecture '{fields.arch}' is not one verify understands "
                           f"({', '.join(archs)})")
    return max(found, key=lambda f: len(type(f).__mro__))


def check(spec, command: str, where) -> list[str]:
    """Refuse, by name and with the reason, what `command` cannot represent exactly; else the notes
    to print before the work starts."""
    family = family_of(spec)
    reason = family.refusal(spec, command)
    if reason:
        verb = command.split()[0]
        raise ConvertError(f"{where}: {verb} refuses variant '{family.variant(spec)}': {reason}")
    return family.warnings(spec, command)


def support_matrix() -> str:
    """The README's variants table, made from the registry (a test keeps the README equal)."""
    head = "| family | covers | " + " | ".join(f"`{c}`" for c in COMMANDS) + " |"
    rows = [head, "|" + "---|" * (len(COMMANDS) + 2)]
    for f in _REGISTRY.values():
        rows.append(f"| {f.title} | {f.examples} | " + " | ".join(f.support(c) for c in COMMANDS) + " |")
    return "\n".join(rows) + "\n"


# Registration order is the table's order.
from . import minicpm, minicpm_moe, minicpm3, llama, mixtral, refused  # noqa: E402,F401
from .refused import RefusedByConfig  # noqa: E402
