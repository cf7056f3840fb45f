"""One reading of the options that take several names ("fp32,fp16", ["torch", "ort"]), for the
library functions and, through them, the command line."""

from __future__ import annotations

from collections.abc import Sequence

from astro_trt.errors import AstroError, ConfigError


def split_list(value: object) -> list[object] | None:
    """The one reading of a list option: 'a, b,' or ['a', 'b'] -> ['a', 'b'] (text stripped, empty
    items dropped, order kept); None for anything that is neither text nor a list or tuple. What an
    item may be, and the refusal, are the caller's (it names its option and the fix)."""
    if isinstance(value, str):
        raw: list[object] = list(value.split(","))
    elif isinstance(value, (list, tuple)):
        raw = list(value)
    else:
        return None
    items = [v.strip() if isinstance(v, str) else v for v in raw]
    return [v for v in items if v != ""]


def comma_list(value: object, choices: Sequence[str], option: str, error: type[AstroError] = ConfigError) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (lower case, order kept, duplicates dropped); anything
    else, an empty list, or a name outside ``choices`` raises ``error`` naming ``option``."""
    raw = split_list(value)
    items = [v.lower() if isinstance(v, str) else v for v in raw or []]
    if raw is None or not items or any(v not in choices for v in items):
        raise error(f"{option} {value!r}: choose a comma list of {list(choices)}")
    return list(dict.fromkeys(items))


__all__ = ["comma_list", "split_list"]
