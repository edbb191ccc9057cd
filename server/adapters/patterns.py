"""PEFT's rules for matching module paths against `target_modules`, `rank_pattern` and `alpha_pattern`.

They reproduce peft 0.21 (`check_target_module_exists` and `get_pattern_key`), so an adapter
means here exactly what it means in PEFT. The patterns come from an uploaded file and Python's
`re` backtracks, so every pattern is checked by `check_pattern` before it is matched: `(a|a)*b`
against a module path would hold the server for minutes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from plait.server.adapters.errors import AdapterFormatError

ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer but the output projection
MAX_PATTERN_CHARS = 256
# Unbounded repeats (`*`, `+`, `{m,n}`) allowed in one pattern. Each repeat in a row multiplies
# the ways a failing match can split a ~40-character module path; five keep that cheap.
MAX_PATTERN_REPEATS = 5

_REPEAT = re.compile(r"[*+]|\{\d*,?\d*\}")


def check_pattern(pattern: str, field: str) -> None:
    """Refuse a regular expression that does not compile or could backtrack for long.

    Refused: a repeated group holding a repeat, an optional part or a branch (`(a+)+`,
    `(a?)*`, `(a|ab)*`), and more than MAX_PATTERN_REPEATS repeats. The patterns PEFT users
    write (`q_proj`, `.*\\.(q_proj|v_proj)`, `model.layers.0.self_attn.q_proj`) all pass.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterFormatError(f"{field}: pattern is longer than {MAX_PATTERN_CHARS} characters", field)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterFormatError(f"{field}: {pattern!r} is not a valid regular expression: {exc}", field) from None
    repeats = 0
    open_groups: list[bool] = []  # per open group: holds a repeat, an optional part or a branch
    after_complex_group = False
    i = 0
    while i < len(pattern):
        char, repeat = pattern[i], _REPEAT.match(pattern, i)
        if repeat:
            if after_complex_group:
                raise AdapterFormatError(f"{field}: {pattern!r} repeats a group that itself repeats or branches", field)
            repeats += 1
            i = repeat.end()
        elif char == "\\":
            i += 2
        elif char == "[":
            i = _class_end(pattern, i)
        elif char == "(":
            open_groups.append(False)
            i += 2 if pattern.startswith("?", i + 1) else 1  # `(?:`, `(?P<` are group syntax, not repeats
        elif char == ")":
            complex_group = open_groups.pop()
            if open_groups and complex_group:
                open_groups[-1] = True
            i += 1
            after_complex_group = complex_group
            continue
        else:
            i += 1
        if (repeat or char in "?|") and open_groups:
            open_groups[-1] = True
        after_complex_group = False
    if repeats > MAX_PATTERN_REPEATS:
        raise AdapterFormatError(f"{field}: {pattern!r} has more than {MAX_PATTERN_REPEATS} repeats", field)


def _class_end(pattern: str, start: int) -> int:
    """Index just past the character class opening at `start` (`[]...]` and `[^]...]` hold a literal `]`)."""
    i = start + 1
    if pattern.startswith("^", i):
        i += 1
    if pattern.startswith("]", i):
        i += 1
    while pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def is_targeted(target_modules: str | Sequence[str], module_path: str) -> bool:
    """Whether PEFT puts LoRA on this module: a string is a regex that must match the whole path,
    a list names modules by their full path or by a dot-separated suffix of it."""
    if isinstance(target_modules, str):
        return target_modules == ALL_LINEAR or re.fullmatch(target_modules, module_path) is not None
    return module_path in target_modules or any(module_path.endswith(f".{name}") for name in target_modules)


def pattern_key(pattern_keys: Iterable[str], module_path: str) -> str | None:
    """The first `rank_pattern`/`alpha_pattern` key that applies to this module, or None.

    PEFT reads each key as a regex that must match the whole path or a suffix of it starting
    after a dot, so `q_proj` applies to every `...q_proj` and `layers.0.self_attn.q_proj` to one.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None
