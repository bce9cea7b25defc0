"""How an error from elsewhere (a peer, a kernel, a library) is quoted in ours: a leaf module
that imports nothing, so the command line can use it before torch is loaded."""

from __future__ import annotations


def first_line(err: BaseException, *, kind: bool = False) -> str:
    """The first line of ``err``'s message (its type's name when empty), after the type's name
    when ``kind``: how an error from elsewhere (a peer, a kernel, a library) is quoted in ours."""
    name = type(err).__name__
    text = str(err).strip()
    if not text:
        return name
    first = text.splitlines()[0]
    return f"{name}: {first}" if kind else first
