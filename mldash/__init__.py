"""mldash: artifact storage for ML training that never makes the training loop wait.

    from mldash import Experiment, dxp

    with Experiment(prefix="alice/vision/resnet-01").run as exp:
        exp.files("checkpoints").save_torch(model, to="model.pt")   # returns once spooled locally

See docs/client.md for the whole API.
"""

from mldash.errors import (
    CatalogUnavailableError,
    CommittedElsewhereError,
    ConfigError,
    FileTooLargeError,
    InvalidInputError,
    MissingDependencyError,
    MldashError,
    NotFoundError,
    SourceNotFoundError,
    SpoolCorruptError,
    SpoolFullError,
    UploadFailedError,
    WaitTimeoutError,
)
from mldash.experiment import Experiment, RunContext, dxp
from mldash.files import FilesHandle

__version__ = "0.1.0"

__all__ = [
    "CatalogUnavailableError",
    "CommittedElsewhereError",
    "ConfigError",
    "Experiment",
    "FileTooLargeError",
    "FilesHandle",
    "InvalidInputError",
    "MissingDependencyError",
    "MldashError",
    "NotFoundError",
    "RunContext",
    "SourceNotFoundError",
    "SpoolCorruptError",
    "SpoolFullError",
    "UploadFailedError",
    "WaitTimeoutError",
    "__version__",
    "dxp",
]
