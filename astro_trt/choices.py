"""One reading of the options that take several names ("fp32,fp16", ["torch", "ort"]), for the
library functions and, through them, the command line."""

from __future__ import annotations

from collections.abc import Sequence

from astro_trt.errors import AstroError, ConfigError


def comma_list(value: object, choices: Sequence[str], option: str, error: type[AstroError] = ConfigError) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (lower case, order kept, duplicates dropped); anything
    else, an empty list, or a name outside ``choices`` raises ``error`` naming ``option``."""
    raw = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    items = [v.strip().lower() if isinstance(v, str) else v for v in raw or []]
    items = [v for v in items if v != ""]
    if raw is None or not items or any(v not in choices for v in items):
        raise error(f"{option} {value!r}: choose a comma list of {list(choices)}")
    return list(dict.fromkeys(items))


__all__ = ["comma_list"]
