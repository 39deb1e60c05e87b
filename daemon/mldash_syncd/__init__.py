"""mldash-syncd: the daemon that drains mldash spools into object storage and the catalog."""

from typing import Any

__all__ = ["Daemon", "RunReport", "drain"]


def __getattr__(name: str) -> Any:  # lazy: `mldash-syncd --help` should not import boto and pymongo
    if name in __all__:
        from mldash_syncd import service

        return getattr(service, name)
    raise AttributeError(name)
