"""A real store or catalog with some of its methods replaced — fault injection at the interface.

Everything not overridden goes to the wrapped object, so the daemon talks to the real backend except where a
test says otherwise. Subclasses override the methods they change.
"""

from __future__ import annotations

from typing import Any


class Wrapped:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def __aenter__(self) -> Wrapped:
        await self._inner.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.close()
