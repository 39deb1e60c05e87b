"""The spool: the on-disk contract between training processes and mldash-syncd (docs/spool-format.md)."""

from mldash.spool.enqueue import Enqueuer, EntrySpec
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.manifest import FORMAT_VERSION, Manifest
from mldash.spool.states import State

__all__ = ["FORMAT_VERSION", "Enqueuer", "EntrySpec", "Manifest", "SpoolIndex", "SpoolLayout", "State"]
