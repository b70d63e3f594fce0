"""Which build settings change what a store holds, derived field by field from the config dataclasses.

Every field of the configs a build takes (:class:`DataConfig`, :class:`ModelConfig`,
:class:`EncodeConfig`, :class:`BuildConfig`) is declared here exactly once: either in
:data:`STORED_AS` (the manifest field that records it; a build or ``index add`` on an existing
store must match it, else rows encoded two ways would sit side by side) or in :data:`NOT_STORED`
(why it cannot change a stored value). ``tests/test_faults.py`` fails for a field that is in
neither, so a new option cannot slip through unmatched as ``--lowest-likelihood-ratio`` once did.

:data:`BUILD_MUST_MATCH` (the manifest fields :meth:`forvalue.storage.store.Store.create` compares)
is derived from it. :data:`~forvalue.schemas.manifest.MUST_MATCH` stays the narrower set that
decides whether two encodings' *scores* are comparable (queries, value models, the validation cache).
"""

from __future__ import annotations

from dataclasses import fields

from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig
from forvalue.schemas.manifest import MUST_MATCH, Manifest

BUILD_CONFIGS = (DataConfig, ModelConfig, EncodeConfig, BuildConfig)

# (config class, field) -> the manifest field that records its effect on stored values.
STORED_AS: dict[tuple[str, str], str] = {
    ("ModelConfig", "path"): "model_weights_sha256",
    ("ModelConfig", "adapter"): "adapter_sha256",
    ("ModelConfig", "dtype"): "dtype",
    ("ModelConfig", "image_max_pixels"): "image_max_pixels",
    ("DataConfig", "chat_template"): "chat_template",
    ("DataConfig", "max_length"): "max_length",
    ("EncodeConfig", "top_m"): "top_m",
    ("EncodeConfig", "score_tokens"): "score_tokens",
    ("EncodeConfig", "lowest_likelihood_ratio"): "lowest_likelihood_ratio",
    ("EncodeConfig", "hidden_dtype"): "hidden_dtype",
    ("EncodeConfig", "int8_block"): "hidden_block",
    ("EncodeConfig", "hidden_rank"): "hidden_rank",
    ("EncodeConfig", "probs_dtype"): "probs_dtype",
    ("EncodeConfig", "sketch_dim"): "sketch_dim",
    ("EncodeConfig", "sketch_vocab_buckets"): "sketch_vocab_buckets",
    ("EncodeConfig", "sketch_hidden_cols"): "sketch_hidden_cols",
    ("EncodeConfig", "sketch_seed"): "sketch_seed",
    ("EncodeConfig", "sketch_basis"): "sketch_basis",
    ("EncodeConfig", "sketch_heavy_ids"): "sketch_heavy_ids",
}

# (config class, field) -> why the field cannot change a stored value.
NOT_STORED: dict[tuple[str, str], str] = {
    ("DataConfig", "format"): "how input rows are read (each row's format is recorded in its own columns)",
    ("DataConfig", "prompt_column"): "names an input column",
    ("DataConfig", "response_column"): "names an input column",
    ("DataConfig", "text_column"): "names an input column",
    ("DataConfig", "messages_column"): "names an input column",
    ("DataConfig", "id_column"): "names an input column",
    ("DataConfig", "label_column"): "names an input column",
    ("DataConfig", "image_column"): "names an input column (recorded as the queries' default, not matched)",
    ("ModelConfig", "device"): "where the forward pass runs; the dtype (matched) fixes the numbers",
    ("ModelConfig", "trust_remote_code"): "permission to run the model folder's code; the weights are matched",
    ("EncodeConfig", "on_bad"): "which rows are kept, not how they are encoded",
    ("BuildConfig", "data"): "a group of fields, each declared here",
    ("BuildConfig", "model"): "a group of fields, each declared here",
    ("BuildConfig", "encode"): "a group of fields, each declared here",
    ("BuildConfig", "batch_size"): "samples per forward pass (padding is masked)",
    ("BuildConfig", "write_every"): "samples per commit",
    ("BuildConfig", "shard"): "which ids this worker takes",
    ("BuildConfig", "dedupe"): "which rows are kept, not how they are encoded",
    ("BuildConfig", "progress"): "display only",
}

# Manifest fields that describe rather than determine the stored values (never compared).
DESCRIPTIVE = ("model_path", "adapter_path", "image_column", "schema_version", "package_version")
# ... and the layout that follows from the schema version and the vocabulary size (ids dtype, sketch dtype)
DESCRIPTIVE += ("ids_dtype", "sketch_dtype")

BUILD_MUST_MATCH: tuple[str, ...] = tuple(dict.fromkeys([*MUST_MATCH, *STORED_AS.values()]))


def undeclared() -> list[str]:
    """Config fields in neither :data:`STORED_AS` nor :data:`NOT_STORED` (``Class.field``); must be empty."""
    out = []
    for cls in BUILD_CONFIGS:
        for f in fields(cls):
            key = (cls.__name__, f.name)
            if (key in STORED_AS) == (key in NOT_STORED):
                out.append(f"{cls.__name__}.{f.name}")
    manifest = {f.name for f in fields(Manifest)}
    out += [f"Manifest.{name}" for name in manifest if name not in BUILD_MUST_MATCH and name not in DESCRIPTIVE]
    out += [f"STORED_AS -> Manifest.{name} (no such field)" for name in STORED_AS.values() if name not in manifest]
    return out
