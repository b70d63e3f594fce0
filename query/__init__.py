"""forvalue: which training samples matter for a model's behaviour (For-Value, forward-only data valuation).

One forward pass over the training set stores, per sample and scored token, the last hidden
state ``h`` and the sparse prediction error ``e`` in a Lance store; a validation sample ``v`` then
scores every training sample ``i`` exactly by

    S(v, i) = <G_v, G_i>,   G = sum_k e_k h_k^T

the inner product of the LM-head gradients, computed without a backward pass. Larger means
training sample ``i`` raises the likelihood of ``v`` more.

Example
-------
>>> import forvalue
>>> st = forvalue.open(store_path)                     # or forvalue.build(["train.jsonl"], "runs/store")
>>> top = st.query(validation_path, forvalue.QueryConfig(top_k=2, progress=False)).top
>>> top.column_names[:4]
['validation_id', 'validation_label', 'rank', 'train_id']
>>> audit = st.audit(validation_path, "doc", forvalue.AuditConfig(progress=False))
>>> len(audit.select(top="50%"))
6

Everything listed in ``__all__`` is the public API: :func:`open` and :func:`build` return a
:class:`Store`, and all else is a method of it (or of its :class:`Audit` objects) returning a typed
result (:mod:`forvalue.results`). The CLI (``forvalue --help``) calls only these. Settings are the
dataclasses of :mod:`forvalue.schemas.config`; every error is a :class:`ForValueError` (subclasses
in :mod:`forvalue.schemas.errors`). Submodules are loaded on first use, so ``import forvalue`` is cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:  # the one version: pyproject.toml's, as installed (the manifest's package_version reads the same)
    __version__ = version("forvalue")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

# public name -> module that defines it (imported on first access, PEP 562)
_WHERE = {
    # stores: open or build one; everything else is a method of what these return
    "open": "forvalue.store",
    "build": "forvalue.store",
    "Store": "forvalue.store",
    "Audit": "forvalue.store",
    # distilled value models: value new data without the big model
    "ValueModel": "forvalue.value_model",
    "estimate": "forvalue.estimates",
    "select_by_values": "forvalue.estimates",
    # the built-in job
    "run_demo": "forvalue.demo",
    # settings
    "BuildConfig": "forvalue.schemas.config",
    "DataConfig": "forvalue.schemas.config",
    "EncodeConfig": "forvalue.schemas.config",
    "ModelConfig": "forvalue.schemas.config",
    "QueryConfig": "forvalue.schemas.config",
    "ExplainConfig": "forvalue.schemas.config",
    "AuditConfig": "forvalue.schemas.config",
    "DistillConfig": "forvalue.schemas.config",
    "PricingConfig": "forvalue.schemas.config",
    "EngineConfig": "forvalue.schemas.config",
    # the extension point: anything that runs a model for the build and the queries
    "Runner": "forvalue.indexer.runner",
    # the base of every error the product raises (one line, exit status 2 in the CLI)
    "ForValueError": "forvalue.schemas.errors",
}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'forvalue' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
