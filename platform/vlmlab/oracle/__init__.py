"""The black box: the Oracle contract and the backends; the ledger's names again.

>>> from vlmlab.oracle import create_oracle
>>> oracle = create_oracle("conse")                      # offline stand-in
>>> oracle = create_oracle("open_clip:ViT-B-16", pretrained="openai")

Other oracles (the Serve pool's client in ``vlmlab.pool``, the HTTP client in
``vlmlab.serving``) keep the same contract with the checks and the metering
exported here, so a refused call does no work wherever it is served.
"""

from __future__ import annotations

from typing import Any

from vlmlab.errors import BudgetExceededError
from vlmlab.ledger import (  # the ledger is its own package; named here for the oracle's users
    DEFAULT_BUDGET_KEY,
    JournaledLedger,
    Ledger,
    PostgresLedger,
    QueryLedger,
    Reservation,
    Usage,
    is_postgres_uri,
    metered,
    open_ledger,
    redact_postgres_uri,
)
from vlmlab.oracle._base import FineTunableImage, FineTunableText, LocalOracle, LogitsRequest
from vlmlab.oracle._cache import default_cache_dir
from vlmlab.oracle._protocol import (
    ImageSet,
    ImageSetRef,
    Oracle,
    OracleMetadata,
    PixelSource,
    pixel_batches,
)
from vlmlab.oracle._registry import (
    backend_takes_model,
    check_backend,
    create_oracle,
    list_backends,
    register_backend,
)
from vlmlab.oracle._validation import (
    check_call,
    image_set_ref,
    scoped_image_set_id,
    validate_class_names,
    validate_contexts,
    validate_indices,
)


def __getattr__(name: str) -> Any:
    # Backend classes load their model libraries (open_clip, sentence-transformers): on demand.
    if name in ("OpenClipOracle", "register_model_configs", "preprocess_pixels"):
        from vlmlab.oracle import _open_clip

        return getattr(_open_clip, name)
    if name == "ConseOracle":
        from vlmlab.oracle._conse import ConseOracle

        return ConseOracle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BUDGET_KEY",
    "BudgetExceededError",
    "ConseOracle",
    "FineTunableImage",
    "FineTunableText",
    "ImageSet",
    "ImageSetRef",
    "JournaledLedger",
    "Ledger",
    "LocalOracle",
    "LogitsRequest",
    "OpenClipOracle",
    "Oracle",
    "OracleMetadata",
    "PixelSource",
    "PostgresLedger",
    "QueryLedger",
    "Reservation",
    "Usage",
    "backend_takes_model",
    "check_backend",
    "check_call",
    "create_oracle",
    "default_cache_dir",
    "image_set_ref",
    "is_postgres_uri",
    "list_backends",
    "metered",
    "open_ledger",
    "pixel_batches",
    "preprocess_pixels",
    "redact_postgres_uri",
    "register_backend",
    "register_model_configs",
    "scoped_image_set_id",
    "validate_class_names",
    "validate_contexts",
    "validate_indices",
]
