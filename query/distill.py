"""Distil an audit into a cheap value model (the ALinFiK idea) and value new data with it.

``distill_value_model`` fits a student (:mod:`forvalue.value_model`) that predicts a training sample's value
under an audit (``score_mean``, and ``mean_vs_label:L`` when the audit has validation labels) from
the sample's text alone, on a random labelled subset of the audited rows; the rest is held out and
reported. ``estimate`` values new samples with the student only (no LLM), streaming, and reports
its throughput against the store's build throughput. ``select_by_values`` turns estimated values
into a training subset, like :func:`forvalue.select_subset` does for audits.

The fit is ridge regression (:mod:`forvalue.ridge`) on features of the texts; what it learns from is
read from the store by :mod:`forvalue.value_features`; :mod:`forvalue.estimates` values new data.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from forvalue.metrics import agreement
from forvalue.results import ValueModelEvaluation
from forvalue.ridge import Design, fit_ridge
from forvalue.schemas.config import DistillConfig
from forvalue.schemas.errors import ForValueError
from forvalue.schemas.manifest import PACKAGE_VERSION
from forvalue.session import storage_of
from forvalue.storage.store import Store
from forvalue.value_features import (
    audit_targets,
    id_hashes,
    id_hashes_unsorted,
    load_embedding_table,
    store_identity,
    stored_texts,
)
from forvalue.value_model import (
    EMBED_POOLINGS,
    NgramFeatures,
    ValueModel,
    ValueModelError,
    check_save_folder,
    pool_divisor,
    pool_length_feature,
    token_ids,
)

MIN_LABELLED = 3


# -- distil ------------------------------------------------------------------------------------------------
@dataclass
class DistillReport:
    """Outcome of :func:`distill_value_model`: the chosen student, its fit, and held-out agreement with the audit."""

    path: str
    student: str
    targets: list[str]
    n_audited: int
    n_labelled: int
    n_heldout: int
    loo: dict
    heldout: dict | None
    candidates: dict
    seconds: float


def _fit_student(student: str, texts: list[str], Y: np.ndarray, config: DistillConfig, store: Store):
    """Fit one student on ``texts``; returns (ValueModel without meta, RidgeFit)."""
    if student == "ngram":
        feats = NgramFeatures(dim=config.ngram_dim)
        fit = fit_ridge(Design(len(texts), feats.n_features, csr=feats.rows(texts)), Y, config.seed)
        arrays = {"weight": fit.weight, "bias": fit.bias}
        vm = ValueModel("ngram", [], arrays, {"features": {"kind": "hashed word + byte n-grams", **feats.spec()}})
        return vm, fit
    tokenizer, table = load_embedding_table(store)
    # the store's audit valued each sample on its first max_length tokens: the student sees those (a long text
    # summed whole was valued far outside the targets' range)
    max_tokens = int(store.manifest.max_length)
    ids = token_ids(tokenizer, texts, max_tokens)
    sums = np.stack([table[i].sum(axis=0, dtype=np.float64) if i else np.zeros(table.shape[1]) for i in ids])
    lengths = np.array([len(i) for i in ids], np.float64)
    best = None
    for pooling in EMBED_POOLINGS:  # both poolings fitted; the better leave-one-out Spearman is kept
        X = np.concatenate(
            [sums / pool_divisor(pooling, lengths)[:, None], pool_length_feature(pooling, lengths)[:, None]], axis=1
        )
        fit = fit_ridge(Design(len(texts), X.shape[1], dense=X), Y, config.seed)
        rho = np.nan_to_num(fit.loo["spearman"], nan=-np.inf)
        if best is None or rho > np.nan_to_num(best[1].loo["spearman"], nan=-np.inf):
            best = (pooling, fit)
    pooling, fit = best
    d = table.shape[1]
    arrays = {
        "token_table": table.astype(np.float64) @ fit.weight[:d],
        "length_weight": fit.weight[d],
        "bias": fit.bias,
    }
    meta = {
        "features": {
            "kind": "pooled input embeddings of the store model",
            "pooling": pooling,
            "vocab_size": int(table.shape[0]),
            "hidden_size": int(d),
            "max_tokens": max_tokens,
        }
    }
    return ValueModel("embed", [], arrays, meta, tokenizer), fit


def distill_value_model(
    store: str | Path | Store, audit: str, out: str | Path, config: DistillConfig = DistillConfig()
) -> DistillReport:
    """Fit a value model on audit ``audit`` of ``store`` and save it to folder ``out``.

    Parameters
    ----------
    store : path or Store
    audit : str
        Audit name; its ``score_mean`` (and ``mean_vs_label:L`` columns) are the targets.
    out : path
        Folder of the value model (created; an existing value model there is replaced).
    config : DistillConfig
        Student, labelled subset (``fraction`` / ``max_samples``; the rest is held out), seed.

    Returns
    -------
    DistillReport

    Example
    -------
    >>> st = forvalue.open(store_path)
    >>> _ = st.audit([validation_path], "v1", forvalue.AuditConfig(progress=False))
    >>> r = distill_value_model(store_path, "v1", "vm")          # st.audits["v1"].distill("vm") calls this
    >>> r.n_audited, r.path
    (12, 'vm')
    """
    from forvalue.audit import load_audit
    from forvalue.storage.files import FOLDER, check_outputs

    check_outputs({"--out": (out, (FOLDER,))}, [store.path if isinstance(store, Store) else store])
    started = time.perf_counter()
    out = Path(out)
    check_save_folder(out)  # before any work: a folder of other files would lose them to the save
    st = storage_of(store)
    table, meta = load_audit(st, audit)
    targets = audit_targets(table)
    ids = table.column("id").to_pylist()
    Y_all = np.stack([table.column(t).to_numpy(zero_copy_only=False).astype(np.float64) for t in targets], axis=1)
    n = len(ids)
    if config.fraction is not None:
        k = int(math.floor(config.fraction * n + 0.5))  # halves up, as --top N% (round() went to even)
    elif config.max_samples is not None:
        k = min(config.max_samples, n)
    else:
        k = n
    if k < MIN_LABELLED:
        raise ForValueError(
            f"audit '{audit}' gives {k} labelled samples (of {n}); a value model needs at least "
            f"{MIN_LABELLED}: raise --fraction or --max-samples"
        )
    if not np.isfinite(Y_all).all():
        raise ForValueError(f"audit '{audit}' has non-finite scores; re-run the audit")
    perm = np.random.default_rng(config.seed).permutation(n)
    lab, held = np.sort(perm[:k]), np.sort(perm[k:])
    texts_by_id = stored_texts(st)
    missing = [i for i in ids if i not in texts_by_id]
    if missing:
        raise ForValueError(
            f"audit '{audit}' names {len(missing)} samples the store no longer has (e.g. "
            f"'{missing[0]}'); re-run the audit"
        )
    texts = [texts_by_id[i] for i in ids]
    lab_texts = [texts[j] for j in lab]
    students = ("ngram", "embed") if config.student == "auto" else (config.student,)
    fits, candidates = {}, {}
    for student in students:
        try:
            vm, fit = _fit_student(student, lab_texts, Y_all[lab], config, st)
        except ForValueError as exc:
            if config.student != "auto":
                raise
            candidates[student] = {"skipped": str(exc)}
            continue
        vm.targets = targets
        entry = {"loo": fit.loo, "lambda_relative": fit.lam_relative}
        if len(held):
            entry["heldout"] = agreement(vm.predict([texts[j] for j in held])[:, 0], Y_all[held, 0])
        candidates[student] = entry
        fits[student] = (vm, fit)
    chosen = max(fits, key=lambda s: (np.nan_to_num(fits[s][1].loo["spearman"], nan=-np.inf), s == "ngram"))
    vm, fit = fits[chosen]
    heldout = candidates[chosen].get("heldout")
    vm.arrays["labelled_id_hash"] = id_hashes(ids[j] for j in lab)
    vm.meta.update(
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "package_version": PACKAGE_VERSION,
            "store": store_identity(st),
            "audit": {
                "name": audit,
                "version": meta.get("version"),
                "validation_sha256": meta["validation_sha256"],
                "normalize": meta.get("settings", {}).get("normalize", "none"),
                "variant": score_variant(meta.get("settings", {})),
                "n_train": n,
                "validation_labels": meta.get("validation_labels", []),
            },
            "fit": {
                "method": "ridge, lambda by exact leave-one-out Spearman of score_mean",
                "lambda": fit.lam,
                "lambda_relative": fit.lam_relative,
                "lambda_grid": fit.grid,
                "n_labelled": int(k),
                "n_heldout": int(len(held)),
                "seed": config.seed,
                "loo": fit.loo,
                "heldout": heldout,
                "candidates": candidates,
                "settings": asdict(config),
            },
        }
    )
    vm.save(out)
    return DistillReport(
        str(out),
        chosen,
        targets,
        n,
        int(k),
        int(len(held)),
        fit.loo,
        heldout,
        candidates,
        time.perf_counter() - started,
    )


# -- identity checks ---------------------------------------------------------------------------------------
def _short(value) -> str:
    """A setting as the refusal prints it: hashes cut to 12 characters."""
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def check_compatible(vm: ValueModel, store: Store, audit_meta: dict | None = None) -> None:
    """Refuse a store (other model or encoding settings) or an audit (other validation set) ``vm`` was not fit for."""
    mine = vm.meta.get("store", {})
    theirs = store_identity(store)
    if mine.get("manifest_fingerprint") != theirs["manifest_fingerprint"]:
        was, now = mine.get("settings") or {}, theirs["settings"]
        differ = [k for k in now if k in was and was[k] != now[k]]
        what = (  # a model saved before the settings were recorded names the weights only
            ", ".join(f"{k} {_short(was[k])} there, {_short(now[k])} here" for k in differ)
            if differ
            else f"model weights sha256 {str(mine.get('model_weights_sha256'))[:12]} there, "
            f"{store.manifest.model_weights_sha256[:12]} here, or other encoding settings"
        )
        raise ValueModelError(
            f"value model was trained on store {mine.get('path')}, not on {store.path} ({what}); distil one for "
            "this store"
        )
    if audit_meta is not None:
        a = vm.meta.get("audit", {})
        mine_variant = score_variant(a.get("variant") or {"normalize": a.get("normalize", "none")})
        their_variant = score_variant(audit_meta.get("settings", {}))
        if a.get("validation_sha256") != audit_meta["validation_sha256"] or mine_variant != their_variant:
            raise ValueModelError(
                f"value model was trained on audit '{a.get('name')}' (validation sha256 "
                f"{str(a.get('validation_sha256'))[:12]}, {_fmt_variant(mine_variant)}), not on audit "
                f"'{audit_meta['name']}' (validation sha256 {audit_meta['validation_sha256'][:12]}, "
                f"{_fmt_variant(their_variant)}); distil one for this audit"
            )


def score_variant(settings: dict) -> dict:
    """The score variant of an audit's settings (older audits: the paper's defaults), as scored: whitening implies
    centring, so ``--whiten 1`` and ``--whiten 1 --center mean`` (what ``--whiten auto`` records) are one variant."""
    from forvalue.engine.variant import variant_options

    variant = {"normalize": settings.get("normalize", "none"), **variant_options(settings)}
    if variant["whiten"] is not None:
        variant["center"] = "mean"
    return variant


def _fmt_variant(variant: dict) -> str:
    return ", ".join(f"{k} {'off' if v is None else v}" for k, v in variant.items())


def evaluate_value_model(
    value_model: str | Path | ValueModel, store: str | Path | Store, audit: str
) -> ValueModelEvaluation:
    """Agreement of a value model with the exact values of an audit it was trained for
    (:meth:`forvalue.Audit.evaluate` calls it); refuses a store or audit the model was not trained for.

    Example
    -------
    >>> st = forvalue.open(store_path)
    >>> _ = st.audit([validation_path], "v1", forvalue.AuditConfig(progress=False))
    >>> _ = st.audits["v1"].distill("vm")
    >>> evaluate_value_model("vm", store_path, "v1").all["n"]
    12
    """
    from forvalue.audit import load_audit

    vm = value_model if isinstance(value_model, ValueModel) else ValueModel.load(value_model)
    st = storage_of(store)
    table, meta = load_audit(st, audit)
    check_compatible(vm, st, meta)
    ids = table.column("id").to_pylist()
    exact = table.column("score_mean").to_numpy()
    texts = stored_texts(st, ids)
    est = vm.predict([texts[i] for i in ids])[:, 0]
    labelled = np.isin(id_hashes_unsorted(ids), vm.arrays.get("labelled_id_hash", np.zeros(0, np.int64)))
    out = pa.table({"id": ids, "value": est, "exact": exact, "labelled": labelled})
    held = ~labelled
    return ValueModelEvaluation(
        heldout=agreement(est[held], exact[held]) if held.sum() >= 2 else None,
        all=agreement(est, exact),
        table=out,
    )
