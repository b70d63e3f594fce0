"""The store-session layer: open a store, check it holds samples, load its model with its settings.

Everything above the storage layer that needs "this store and its model" starts here (the
scoring engine, the workflows and the public :class:`forvalue.Store`), so the rule that a store
is scored only with the model it was built with lives in one place.
"""

from __future__ import annotations

from dataclasses import replace

from forvalue.schemas.config import BuildConfig, ModelConfig
from forvalue.schemas.errors import StoreError
from forvalue.storage.store import Store


def settings_for_store(manifest, config: BuildConfig) -> BuildConfig:
    """``config`` with the store's encoding settings, and its model unless ``config`` names one.

    What ``index add`` (:func:`add_to_index`) encodes with: chat template, max length, top-m,
    scored tokens, position filter, hidden dtype and sketch come from the manifest; model path,
    adapter and dtype too, each unless given; columns, ``on_bad``, batch sizes and shard from ``config``.
    """
    m = manifest
    data = replace(
        config.data,
        chat_template=m.chat_template,
        max_length=m.max_length,
        image_column=config.data.image_column or m.image_column,
    )
    model = replace(
        config.model,
        path=config.model.path or m.model_path,
        adapter=config.model.adapter or m.adapter_path,
        dtype=m.dtype if config.model.dtype == "auto" else config.model.dtype,
        image_max_pixels=config.model.image_max_pixels if m.image_max_pixels is None else m.image_max_pixels,
    )
    encode = replace(
        config.encode,
        top_m=m.top_m,
        score_tokens=m.score_tokens,
        lowest_likelihood_ratio=m.lowest_likelihood_ratio,
        hidden_dtype=m.hidden_dtype,
        int8_block=m.hidden_block,
        hidden_rank=m.hidden_rank,
        probs_dtype=m.probs_dtype,
        sketch_dim=m.sketch_dim or 0,
        sketch_vocab_buckets=m.sketch_vocab_buckets,
        sketch_hidden_cols=m.sketch_hidden_cols,
        sketch_seed=m.sketch_seed,
        sketch_basis=m.sketch_basis,
        sketch_heavy_ids=getattr(m, "sketch_heavy_ids", 0) or 0,
    )
    return replace(config, data=data, model=model, encode=encode)


def load_store_runner(store: Store, model: ModelConfig | None = None):
    """Load the store's model (or ``model`` when given) with the store's dtype unless overridden."""
    manifest = store.manifest
    model = model or ModelConfig()
    from forvalue.indexer.model_runner import load_runner

    return load_runner(
        replace(
            model,
            path=model.path or manifest.model_path,
            adapter=model.adapter or manifest.adapter_path,
            dtype=manifest.dtype if model.dtype == "auto" else model.dtype,
            image_max_pixels=model.image_max_pixels if manifest.image_max_pixels is None else manifest.image_max_pixels,
        )
    )


def get_runner(runner, store: Store, model: ModelConfig | None, device: str):
    """``runner`` itself, or what it returns when it is a loader (a function of no argument), or the store's
    model loaded now (``runner`` None): the one way the workflows take a ``runner`` argument."""
    if runner is None:
        return load_store_runner(store, replace(model or ModelConfig(), device=device))
    if callable(runner) and not hasattr(runner, "hidden_states"):  # a loader, not a Runner
        return runner()
    return runner


def storage_of(store) -> Store:
    """The low-level store behind ``store``: a path (or ``s3://`` location), a :class:`forvalue.storage.store.Store`
    (itself), or an object with ``__forvalue_store__()`` (a :class:`forvalue.Store` handle from :func:`forvalue.open`:
    its store at the latest version, with its storage options), so the module-level functions take whatever the user
    holds. A protocol, not an import: the handle's module is a layer above this one."""
    if isinstance(store, Store):
        return store
    if hasattr(type(store), "__forvalue_store__"):
        return store.__forvalue_store__()
    return Store.open(store)


def open_nonempty(store) -> Store:
    """The store at ``store`` (or ``store`` itself; see :func:`storage_of`), refused with one line when it holds no
    sample."""
    store = storage_of(store)
    if store.count() == 0:
        raise StoreError(f"{store.path}: the store holds no samples; add some with 'forvalue index add'")
    return store
