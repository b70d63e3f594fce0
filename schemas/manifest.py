"""The store manifest: what produced the stored vectors.

A query, or a later ``index add``, recomputes the same fields from its own model and
settings; any difference in :data:`MUST_MATCH` is refused, because scores between
vectors of different models or settings are meaningless.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from forvalue.schemas.errors import StoreError
from forvalue.schemas.tables import SCHEMA_VERSION

try:  # the one version: pyproject.toml's, as installed (forvalue.__version__ reads the same)
    PACKAGE_VERSION = version("forvalue")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    PACKAGE_VERSION = "0+unknown"
MANIFEST_FILE = "manifest.json"

# Fields whose difference makes stored and new vectors incomparable.
MUST_MATCH = (
    "model_weights_sha256",
    "adapter_sha256",
    "tokenizer_sha256",
    "dtype",
    "hidden_size",
    "vocab_size",
    "top_m",
    "score_tokens",
    "chat_template",
    "max_length",
    "model_kind",
    "processor_sha256",
    "image_max_pixels",
)

# Settings of how hidden states are stored: a build or ``index add`` that writes rows must use the
# store's (queries need not: a validation sample is encoded at float16 whatever the store holds).
STORAGE_MUST_MATCH = ("hidden_dtype", "hidden_block", "hidden_rank")


@dataclass(frozen=True)
class Manifest:
    """Identity of a store's model and encoding settings (saved as ``manifest.json``)."""

    model_path: str
    model_weights_sha256: str
    adapter_path: str | None
    adapter_sha256: str | None
    tokenizer_sha256: str
    dtype: str
    hidden_size: int
    vocab_size: int
    top_m: int
    score_tokens: str
    chat_template: bool
    max_length: int
    hidden_dtype: str
    lowest_likelihood_ratio: float | None
    model_kind: str = "causal_lm"
    # Vision-language stores ("vlm"): the image column (the default for queries), the
    # downscaling bound of images and a SHA-256 of the image preprocessing + chat template.
    image_column: str | None = None
    image_max_pixels: int | None = None
    processor_sha256: str | None = None
    # Prefilter sketch (forvalue.indexer.sketch.SketchSpec); None: the store has no sketch column.
    sketch_dim: int | None = None
    sketch_vocab_buckets: int = 1
    sketch_hidden_cols: int = 1
    sketch_seed: int = 0
    # "gaussian" (random hidden projection) or "fitted" (STORE/sketch_basis.npy); stores
    # written before the fitted basis existed have no such field and are "gaussian".
    sketch_basis: str = "gaussian"
    # Vocabulary ids with count-sketch buckets of their own (STORE/sketch_vocab.npy); 0: none (older stores).
    sketch_heavy_ids: int = 0
    # Compact encodings (schema version 3; the defaults are what older stores hold): channels per int8
    # scale (0: hidden states are not int8), the type of the error ids, of the top-m probabilities and
    # tail mass, and of the sketch values (forvalue.schemas.tables.samples_schema).
    hidden_block: int = 0
    ids_dtype: str = "int32"
    probs_dtype: str = "float32"
    sketch_dtype: str = "float32"
    # Low-rank tier: hidden states stored as their coordinates in ``hidden_rank`` orthonormal directions
    # fitted to the store's own hidden states (STORE/hidden_basis.npz, forvalue.storage.hidden_basis);
    # 0 = the full hidden state. Validation samples are projected onto the same basis.
    hidden_rank: int = 0
    schema_version: int = SCHEMA_VERSION
    package_version: str = PACKAGE_VERSION

    @property
    def stored_width(self) -> int:
        """Values stored per scored token: ``hidden_rank`` for a low-rank store, else ``hidden_size``."""
        return self.hidden_rank or self.hidden_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(
                f"{source}: not valid JSON ({exc.msg} at line {exc.lineno}); the store is damaged"
            ) from None
        except RecursionError:
            raise StoreError(f"{source}: not a manifest (JSON nested too deeply); the store is damaged") from None
        if not isinstance(raw, dict):
            raise StoreError(f"{source}: not a manifest (a JSON {type(raw).__name__}); the store is damaged")
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in raw and f.default is MISSING]
        if missing:
            raise StoreError(
                f"{source}: missing field(s) {', '.join(missing)}; the store is damaged or from another tool"
            )
        if raw.get("schema_version", 0) > SCHEMA_VERSION:
            raise StoreError(
                f"{source}: schema version {raw['schema_version']} is newer than this forvalue "
                f"({SCHEMA_VERSION}); upgrade forvalue"
            )
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        return cls.from_json(path.read_text(), source=str(path))

    def mismatches(self, other: "Manifest", names: tuple[str, ...] = MUST_MATCH) -> list[str]:
        """Human-readable differences in ``names`` (default :data:`MUST_MATCH`) between ``self`` (the store) and
        ``other``; a build compares :data:`forvalue.schemas.stored_settings.BUILD_MUST_MATCH`."""
        out = []
        for name in names:
            if name == "hidden_block" and self.hidden_dtype != other.hidden_dtype:
                continue  # follows from the dtype (no option of its own): the dtype's line says it
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: store has {a!r}, you have {b!r}")
        return out
