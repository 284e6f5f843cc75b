"""The subcommand dispatch shared by the bench helpers (standard library only)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable


def dispatch(name: str, doc: str | None, cmds: dict[str, Callable[..., None]], argv: list[str]) -> None:
    """Runs `cmds[argv[1]](*argv[2:])`; a wrong subcommand or argument count
    exits with the helper's usage (`doc`)."""
    if len(argv) < 2 or argv[1] not in cmds:
        sys.exit(doc)
    fn = cmds[argv[1]]
    try:
        inspect.signature(fn).bind(*argv[2:])
    except TypeError as e:
        sys.exit(f"{name} {argv[1]}: {e}\n{doc}")
    fn(*argv[2:])
