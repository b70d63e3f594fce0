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
>>> forvalue.build_index(["train.jsonl"], "runs/store")                          # doctest: +SKIP
>>> result = forvalue.run_query("runs/store", ["val.jsonl"], forvalue.QueryConfig(top_k=5))  # doctest: +SKIP
>>> result.top.to_pylist()[0]["train_id"]                                        # doctest: +SKIP
>>> forvalue.run_audit("runs/store", ["val.jsonl"], "v1")                        # doctest: +SKIP
>>> forvalue.select_subset("runs/store", "v1", top="50%", output="subset.jsonl") # doctest: +SKIP

Everything listed in ``__all__`` is the public API; the CLI (``forvalue --help``) calls only
these. Submodules are loaded on first use, so ``import forvalue`` is cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forvalue")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

# public name -> module that defines it (imported on first access, PEP 562)
_WHERE = {
    # building and inspecting stores
    "build_index": "forvalue.indexer.build",
    "add_to_index": "forvalue.api",
    "store_info": "forvalue.maintenance",
    "sketch_store": "forvalue.maintenance",
    "check_store": "forvalue.maintenance",
    # querying
    "run_query": "forvalue.api",
    "explain": "forvalue.engine.explain",
    "write_explanation": "forvalue.present.explain_html",
    # audits and selection
    "run_audit": "forvalue.audit",
    "audits": "forvalue.audit",
    "load_audit": "forvalue.audit",
    "audit_summary": "forvalue.audit",
    "compare_audits": "forvalue.audit",
    "select_subset": "forvalue.audit",
    # distilled value models and data pricing
    "distill_value_model": "forvalue.distill",
    "estimate": "forvalue.distill",
    "evaluate_value_model": "forvalue.distill",
    "select_by_values": "forvalue.distill",
    "ValueModel": "forvalue.value_model",
    "price": "forvalue.pricing",
    "audit_pricing": "forvalue.pricing",
    "values_pricing": "forvalue.pricing",
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
    "DemoConfig": "forvalue.schemas.config",
    "EngineConfig": "forvalue.schemas.config",
    # results
    "BuildReport": "forvalue.indexer.build",
    "QueryResult": "forvalue.api",
    "Explanation": "forvalue.engine.explain",
    "AuditSummary": "forvalue.audit",
    "DistillReport": "forvalue.distill",
    "EstimateReport": "forvalue.distill",
    # the extension point: anything that runs a model for the build and the queries
    "Runner": "forvalue.indexer.runner",
    "load_runner": "forvalue.indexer.model_runner",
    # errors
    "ForValueError": "forvalue.schemas.errors",
    "ConfigError": "forvalue.schemas.errors",
    "InputDataError": "forvalue.schemas.errors",
    "ModelLoadError": "forvalue.schemas.errors",
    "StoreError": "forvalue.schemas.errors",
    "ManifestMismatchError": "forvalue.schemas.errors",
    "BadValuesError": "forvalue.schemas.errors",
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
