"""Distil an audit into a cheap value model (the ALinFiK idea) and value new data with it.

``distill_value_model`` fits a student (:mod:`forvalue.value_model`) that predicts a training sample's value
under an audit (``score_mean``, and ``mean_vs_label:L`` when the audit has validation labels) from
the sample's text alone, on a random labelled subset of the audited rows; the rest is held out and
reported. ``estimate`` values new samples with the student only (no LLM), streaming, and reports
its throughput against the store's build throughput. ``select_by_values`` turns estimated values
into a training subset, like :func:`forvalue.select_subset` does for audits.

The fit is ridge regression in its kernel (dual) form, ``alpha = (K_c + lambda I)^-1 y_c`` with
the centred Gram matrix ``K_c`` (unpenalised intercept); the regularisation ``lambda`` is chosen by
exact leave-one-out on the labelled rows (``r_i = (y_i - yhat_i) / (1 - H_ii)``, one eigendecomposition
for the whole grid), maximising the leave-one-out Spearman correlation of ``score_mean``. Above
``MAX_DUAL`` labelled rows, lambda is chosen the same way on a random ``MAX_DUAL`` of them and the
primal system is solved on all of them by conjugate gradients.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from forvalue.metrics import spearman, top_overlap
from forvalue.results import Selection
from forvalue.schemas.config import DataConfig, DistillConfig
from forvalue.schemas.errors import ForValueError
from forvalue.schemas.manifest import MUST_MATCH, PACKAGE_VERSION
from forvalue.storage.files import TableSink
from forvalue.storage.store import Store
from forvalue.value_model import (
    EMBED_POOLINGS,
    MANIFEST,
    NgramFeatures,
    ValueModel,
    ValueModelError,
    owned_by_a_value_model,
    pool_divisor,
    pool_length_feature,
    token_ids,
)

MAX_DUAL = 4000
LAMBDA_GRID = tuple(10.0 ** np.arange(-5.0, 2.5, 0.5))  # times the mean eigenvalue of K_c
MIN_LABELLED = 3


# -- metrics ---------------------------------------------------------------------------------------
def agreement(estimated: np.ndarray, exact: np.ndarray) -> dict:
    """Spearman, top-10% precision and R^2 of estimated against exact values (1-D arrays)."""
    estimated, exact = np.asarray(estimated, np.float64), np.asarray(exact, np.float64)
    ss = ((exact - exact.mean()) ** 2).sum()
    r2 = float(1.0 - ((exact - estimated) ** 2).sum() / ss) if ss > 0 else float("nan")
    return {
        "n": int(len(exact)),
        "spearman": spearman(estimated, exact),
        "top10_precision": top_overlap(estimated, exact) if len(exact) else float("nan"),
        "r2": r2,
    }


# -- ridge regression --------------------------------------------------------------------------------
@dataclass
class Design:
    """A design matrix: dense (n, p) float64, or CSR arrays of shape (n, p)."""

    n: int
    p: int
    dense: np.ndarray | None = None
    csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def take(self, rows: np.ndarray) -> "Design":
        if self.dense is not None:
            return Design(len(rows), self.p, dense=self.dense[rows])
        indptr, indices, values = self.csr
        lens = np.diff(indptr)[rows]
        sel = np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows]) if len(rows) else np.zeros(0, int)
        new_ptr = np.zeros(len(rows) + 1, np.int64)
        new_ptr[1:] = np.cumsum(lens)
        return Design(len(rows), self.p, csr=(new_ptr, indices[sel], values[sel]))

    def _torch(self):
        import torch

        if self.dense is not None:
            return torch.from_numpy(self.dense)
        indptr, indices, values = self.csr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(
                torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values), size=(self.n, self.p)
            )

    def gram(self) -> np.ndarray:
        """``X X^T``: (n, n) float64."""
        x = self._torch()
        if self.dense is not None:
            return (x @ x.T).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return (x @ x.t().to_sparse_csr()).to_dense().numpy()

    def matmul(self, v: np.ndarray) -> np.ndarray:
        """``X v`` for v (p, T): (n, T)."""
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return (self._torch() @ torch.from_numpy(np.ascontiguousarray(v, np.float64))).numpy()

    def rmatmul(self, u: np.ndarray) -> np.ndarray:
        """``X^T u`` for u (n, T): (p, T)."""
        import torch

        x = self._torch()
        u = torch.from_numpy(np.ascontiguousarray(u, np.float64))
        if self.dense is not None:
            return (x.T @ u).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return (x.t().to_sparse_csr() @ u).numpy()


@dataclass
class RidgeFit:
    """A fitted linear head: ``y = x @ weight + bias``; ``loo`` are leave-one-out metrics at ``lam``."""

    weight: np.ndarray  # (p, T) float64
    bias: np.ndarray  # (T,)
    lam: float
    lam_relative: float
    loo: dict
    grid: list = field(default_factory=list)


def _loo_choose(K: np.ndarray, Z: np.ndarray) -> tuple[float, float, np.ndarray, dict, list]:
    """Choose lambda by exact leave-one-out on Gram ``K`` and centred, standardised targets ``Z`` (n, T).

    The intercept is not penalised: the hat matrix is ``11^T/n + K_c (K_c + lambda I)^-1`` and the
    leave-one-out residual of row i is ``(z_i - zhat_i) / (1 - H_ii)``.

    Returns ``(lam, lam_relative, alpha (n, T), loo metrics, grid [(relative lambda, LOO spearman)])``.
    """
    n = len(K)
    r = K.mean(axis=1)
    Kc = K - r[:, None] - r[None, :] + K.mean()
    s, U = np.linalg.eigh((Kc + Kc.T) / 2)
    s = np.clip(s, 0.0, None)
    scale = max(float(s.sum()) / n, 1e-12)
    UtZ = U.T @ Z
    best = None
    grid = []
    for rel in LAMBDA_GRID:
        lam = rel * scale
        inv = 1.0 / (s + lam)
        alpha = U @ (inv[:, None] * UtZ)
        # hat matrix with the unpenalised intercept: 11^T/n + U diag(s/(s+lam)) U^T (Z is centred)
        shrink = s * inv
        fitted = U @ (shrink[:, None] * UtZ)
        h = 1.0 / n + (U**2) @ shrink
        loo_pred = Z - (Z - fitted) / np.maximum(1.0 - h, 1e-12)[:, None]
        rho = spearman(loo_pred[:, 0], Z[:, 0])
        mse = float(((loo_pred[:, 0] - Z[:, 0]) ** 2).mean())
        key = (-np.inf if np.isnan(rho) else rho, -mse)
        grid.append((float(rel), rho))
        if best is None or key > best[0]:
            best = (key, lam, float(rel), alpha, loo_pred)
    _, lam, rel, alpha, loo_pred = best
    return lam, rel, alpha, agreement(loo_pred[:, 0], Z[:, 0]), grid


def _cg(apply, B: np.ndarray, x0: np.ndarray, iters: int = 500, tol: float = 1e-6) -> np.ndarray:
    """Conjugate gradients for the SPD system ``apply(X) = B``, every column of (p, T) at once."""
    x = x0.copy()
    r = B - apply(x)
    p = r.copy()
    rs = (r * r).sum(axis=0)
    stop = tol**2 * np.maximum((B * B).sum(axis=0), 1e-300)
    for _ in range(iters):
        if np.all(rs <= stop):
            break
        ap = apply(p)
        a = rs / np.maximum((p * ap).sum(axis=0), 1e-300)
        x += a * p
        r -= a * ap
        rs_new = (r * r).sum(axis=0)
        p = r + (rs_new / np.maximum(rs, 1e-300)) * p
        rs = rs_new
    return x


def fit_ridge(X: Design, Y: np.ndarray, seed: int = 0) -> RidgeFit:
    """Ridge regression of ``Y`` (n, T) on ``X`` with an intercept, lambda chosen by leave-one-out.

    Targets are standardised per column before the fit (so one lambda suits all) and the
    weights mapped back, so ``predict = x @ weight + bias`` is in the audit's units.
    """
    Y = np.asarray(Y, np.float64)
    n = X.n
    y_mean = Y.mean(axis=0)
    y_sd = Y.std(axis=0)
    y_sd[y_sd == 0] = 1.0
    Z = (Y - y_mean) / y_sd
    x_mean = X.rmatmul(np.full((n, 1), 1.0 / n))[:, 0]  # (p,)
    if n <= MAX_DUAL:
        lam, rel, alpha, loo, grid = _loo_choose(X.gram(), Z)
        w = X.rmatmul(alpha)  # (p, T); sum(alpha) = 0, so the centring term vanishes
    else:
        sub = np.sort(np.random.default_rng(seed).choice(n, MAX_DUAL, replace=False))
        Xs = X.take(sub)
        lam, rel, _, loo, grid = _loo_choose(Xs.gram(), Z[sub])

        def apply(V):  # (X_c^T X_c + lam I) V, X_c = X - 1 x_mean^T
            XV = X.matmul(V) - (x_mean @ V)[None, :]
            return X.rmatmul(XV) - np.outer(x_mean, XV.sum(axis=0)) + lam * V

        rhs = X.rmatmul(Z) - np.outer(x_mean, Z.sum(axis=0))
        w = _cg(apply, rhs, np.zeros_like(rhs))
    w = w * y_sd
    bias = y_mean - x_mean @ w
    return RidgeFit(w, bias, lam, rel, loo, grid)


# -- the store side ------------------------------------------------------------------------------------
def store_identity(store: Store) -> dict:
    """What a value model must match in a store: the model and encoding settings (manifest MUST_MATCH)."""
    m = store.manifest
    must = {k: getattr(m, k) for k in MUST_MATCH}
    fingerprint = hashlib.sha256(json.dumps(must, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "path": str(Path(store.path).resolve()),
        "model_path": m.model_path,
        "model_weights_sha256": m.model_weights_sha256,
        "tokenizer_sha256": m.tokenizer_sha256,
        "manifest_fingerprint": fingerprint,
        "build_samples_per_s": build_throughput(store),
    }


def build_throughput(store: Store) -> float | None:
    """Samples per second of the store's build, from the timestamps of its Lance commits.

    The table is created after the model is loaded and every write batch is one commit, so
    rows added between consecutive commits over the time between them is the encoding
    throughput. Gaps between separate builds (``index add`` later) are left out: pairs slower
    than 20x the median seconds per row.
    """
    try:
        versions = store._dataset().versions()
    except Exception:  # an old pylance without versions(): no throughput, not an error
        return None
    pts = sorted(
        (v["version"], v["timestamp"].timestamp(), int(v.get("metadata", {}).get("total_rows", -1))) for v in versions
    )
    pairs = [(b[2] - a[2], b[1] - a[1]) for a, b in zip(pts, pts[1:]) if a[2] >= 0 and b[2] > a[2] and b[1] > a[1]]
    if not pairs:
        return None
    per_row = np.array([dt / rows for rows, dt in pairs])
    keep = per_row <= 20 * np.median(per_row)
    rows = sum(r for (r, _), k in zip(pairs, keep) if k)
    secs = sum(t for (_, t), k in zip(pairs, keep) if k)
    return float(rows / secs) if secs > 0 else None


def _stored_texts(store: Store, ids: Sequence[str] | None = None) -> dict[str, str]:
    wanted = None if ids is None else set(ids)
    out = {}
    for batch in store.scan(["id", "prompt", "response", "text"], batch_size=8192):
        for r in batch.to_pylist():
            if wanted is None or r["id"] in wanted:
                out[r["id"]] = r["text"] if r["text"] is not None else f"{r['prompt']}{r['response']}"
    return out


def _audit_targets(table: pa.Table) -> list[str]:
    return ["score_mean"] + [c for c in table.column_names if c.startswith("mean_vs_label:")]


def _id_hashes(ids: Iterable[str]) -> np.ndarray:
    """Sorted 63-bit hashes of ids (a compact record of the labelled rows inside the model)."""
    h = [int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "little") >> 1 for i in ids]
    return np.sort(np.array(h, np.int64))


# -- the embed student's inputs ------------------------------------------------------------------------
_EMBED_KEYS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")


def load_embedding_table(store: Store):
    """The store model's tokenizer (``tokenizers.Tokenizer``) and input-embedding table ((V, d) float32).

    A lookup in the safetensors weights; the model itself is never built or run.
    """
    from forvalue.indexer.fingerprint import weights_sha256

    folder = Path(store.manifest.model_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise ForValueError(
            f"store model '{folder}' is not a folder with safetensors weights; the embed student reads "
            "its input-embedding table from there (use --student ngram)"
        )
    if store.manifest.adapter_sha256 is None and weights_sha256(folder) != store.manifest.model_weights_sha256:
        raise ForValueError(
            f"store model '{folder}' has changed since the build (weights SHA-256 differs); "
            "use --student ngram or restore the model"
        )
    from safetensors import safe_open
    from transformers import AutoTokenizer

    table = None
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith(_EMBED_KEYS)), None)
            if key is not None:
                table = f.get_tensor(key).float().numpy()
                break
    if table is None:
        raise ForValueError(
            f"store model '{folder}': no input-embedding tensor ({', '.join(_EMBED_KEYS)}) in its "
            "safetensors files; use --student ngram"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ForValueError(
            f"store model '{folder}': the embed student needs a fast (tokenizers) tokenizer; use --student ngram"
        )
    return backend, table


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
    ids = token_ids(tokenizer, texts)
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
    leftovers = out.is_dir() and all(owned_by_a_value_model(p.name) for p in out.iterdir())  # a killed save
    if out.exists() and (not out.is_dir() or (not leftovers and not (out / MANIFEST).exists())):
        raise ValueModelError(f"{out}: exists and is not a value model folder; choose another --out")
    st = store if isinstance(store, Store) else Store.open(store)
    table, meta = load_audit(st, audit)
    targets = _audit_targets(table)
    ids = table.column("id").to_pylist()
    Y_all = np.stack([table.column(t).to_numpy(zero_copy_only=False).astype(np.float64) for t in targets], axis=1)
    n = len(ids)
    if config.fraction is not None:
        k = int(round(config.fraction * n))
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
    texts_by_id = _stored_texts(st)
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
    vm.arrays["labelled_id_hash"] = _id_hashes(ids[j] for j in lab)
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
def check_compatible(vm: ValueModel, store: Store, audit_meta: dict | None = None) -> None:
    """Refuse a store (other model or encoding settings) or an audit (other validation set) ``vm`` was not fit for."""
    mine = vm.meta.get("store", {})
    theirs = store_identity(store)
    if mine.get("manifest_fingerprint") != theirs["manifest_fingerprint"]:
        raise ValueModelError(
            f"value model was trained on store {mine.get('path')} (model weights sha256 "
            f"{str(mine.get('model_weights_sha256'))[:12]}), not on {store.path} (model weights sha256 "
            f"{store.manifest.model_weights_sha256[:12]}, or other encoding settings); distil one for this store"
        )
    if audit_meta is not None:
        a = vm.meta.get("audit", {})
        if a.get("validation_sha256") != audit_meta["validation_sha256"] or a.get("normalize") != audit_meta.get(
            "settings", {}
        ).get("normalize", "none"):
            raise ValueModelError(
                f"value model was trained on audit '{a.get('name')}' (validation sha256 "
                f"{str(a.get('validation_sha256'))[:12]}, normalize {a.get('normalize')}), not on audit "
                f"'{audit_meta['name']}' (validation sha256 {audit_meta['validation_sha256'][:12]}, normalize "
                f"{audit_meta.get('settings', {}).get('normalize', 'none')}); distil one for this audit"
            )


def evaluate_value_model(value_model: str | Path | ValueModel, store: str | Path | Store, audit: str) -> dict:
    """Agreement of a value model with the exact values of an audit it was trained for.

    Returns
    -------
    dict
        ``heldout`` and ``all`` (:func:`agreement` of ``value`` against ``score_mean`` on the rows
        the model was not fit on, and on every row) and ``table`` (pyarrow: ``id``, ``value``,
        ``exact``, ``labelled``). Refuses a store or audit the model was not trained for.

    Example
    -------
    >>> st = forvalue.open(store_path)
    >>> _ = st.audit([validation_path], "v1", forvalue.AuditConfig(progress=False))
    >>> _ = st.audits["v1"].distill("vm")
    >>> sorted(evaluate_value_model("vm", store_path, "v1"))
    ['all', 'heldout', 'table']
    """
    from forvalue.audit import load_audit

    vm = value_model if isinstance(value_model, ValueModel) else ValueModel.load(value_model)
    st = store if isinstance(store, Store) else Store.open(store)
    table, meta = load_audit(st, audit)
    check_compatible(vm, st, meta)
    ids = table.column("id").to_pylist()
    exact = table.column("score_mean").to_numpy()
    texts = _stored_texts(st, ids)
    est = vm.predict([texts[i] for i in ids])[:, 0]
    labelled = np.isin(_id_hashes_unsorted(ids), vm.arrays.get("labelled_id_hash", np.zeros(0, np.int64)))
    out = pa.table({"id": ids, "value": est, "exact": exact, "labelled": labelled})
    held = ~labelled
    return {
        "heldout": agreement(est[held], exact[held]) if held.sum() >= 2 else None,
        "all": agreement(est, exact),
        "table": out,
    }


def _id_hashes_unsorted(ids: Sequence[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "little") >> 1 for i in ids], np.int64)


# -- estimate ----------------------------------------------------------------------------------------------
@dataclass
class EstimateReport:
    """Outcome of :func:`estimate`: counts, time, throughput against the store's build."""

    n: int
    seconds: float
    samples_per_s: float
    build_samples_per_s: float | None
    speedup: float | None
    output: str | None
    table: pa.Table | None = None


def estimate(
    data: Sequence[str | Path],
    value_model: str | Path | ValueModel,
    output: str | Path | None = None,
    data_config: DataConfig = DataConfig(),
    group_column: str | None = None,
    block: int = 1024,
    progress: bool = False,
) -> EstimateReport:
    """Value every sample of ``data`` with a value model only (no LLM), streaming.

    Parameters
    ----------
    data : paths
        Any input the build reads; ids follow the build's rules (``id`` column, else content hash).
    value_model : path or ValueModel
    output : path, optional
        ``.parquet``, ``.csv`` or ``.jsonl`` with columns ``id``, ``value``, ``value_vs_label:L``
        (when the model has labels) and ``group_column`` (when given). Without it the table is
        returned in the report.
    group_column : str, optional
        A column of the data files naming each sample's provider, copied to the output (data pricing).

    Returns
    -------
    EstimateReport

    Example
    -------
    >>> st = forvalue.open(store_path)
    >>> _ = st.audit([validation_path], "v1", forvalue.AuditConfig(progress=False))
    >>> _ = st.audits["v1"].distill("vm")
    >>> forvalue.estimate([train_path], "vm", output="values.parquet").n
    12
    """
    from forvalue.indexer.data import check_paths, iter_samples_with
    from forvalue.storage.files import check_outputs

    data = list(data)
    model_path = [] if isinstance(value_model, ValueModel) else [value_model]
    check_outputs({"output": (output, (".parquet", ".csv", ".jsonl"))}, [*data, *model_path])
    vm = value_model if isinstance(value_model, ValueModel) else ValueModel.load(value_model)
    if group_column in ("id", *vm.output_columns):
        raise ForValueError(
            f"--group-column {group_column}: the values file has its own '{group_column}' column; "
            "name the provider column differently"
        )
    check_paths(data)
    started = time.perf_counter()
    sink = TableSink(Path(output)) if output is not None else None
    extra = [group_column] if group_column else []
    fields = [pa.field("id", pa.string())] + [pa.field(c, pa.float64()) for c in vm.output_columns]
    fields += [pa.field(c, pa.string()) for c in extra]
    schema = pa.schema(fields)
    kept: list[pa.Table] = []
    n = 0
    from tqdm.auto import tqdm

    bar = tqdm(desc="estimate", unit="sample", disable=not progress, delay=1.0)  # shown only on long runs

    def flush(samples, groups):
        values = vm.predict([s.full_text for s in samples])
        cols = {"id": [s.id for s in samples]}
        cols.update({c: values[:, j] for j, c in enumerate(vm.output_columns)})
        for c in extra:
            cols[c] = [g[c] for g in groups]
        t = pa.table(cols, schema=schema)
        if sink is not None:
            sink.write(t)
        else:
            kept.append(t)
        bar.update(len(samples))

    try:
        samples, groups = [], []
        for sample, extras in iter_samples_with(data, data_config, extra):
            samples.append(sample)
            groups.append(extras)
            if len(samples) >= block:
                flush(samples, groups)
                n += len(samples)
                samples, groups = [], []
        if samples:
            flush(samples, groups)
            n += len(samples)
        if sink is not None:
            sink.close(schema)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    rate = n / seconds if seconds > 0 else float("inf")
    build = vm.meta.get("store", {}).get("build_samples_per_s")
    return EstimateReport(
        n,
        seconds,
        rate,
        build,
        rate / build if build else None,
        str(output) if output is not None else None,
        None if sink is not None else (pa.concat_tables(kept) if kept else schema.empty_table()),
    )


# -- values files and selection ----------------------------------------------------------------------------
def _read_values_jsonl(path: Path) -> pa.Table:
    """A JSONL values file, parsed line by line with the data reader's checks (Arrow's JSON reader crashes
    on deeply nested input)."""
    from forvalue.indexer.data import _json_row

    rows = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            row = _json_row(path, lineno, raw)
            if row is not None:
                rows.append(row)
    if not rows:
        raise ForValueError(f"{path}: holds no values")
    return pa.Table.from_pylist(rows)


def read_values(path: str | Path, column: str = "value") -> pa.Table:
    """A values file written by :func:`estimate` (.parquet, .csv or .jsonl), checked: ``id`` + ``column``."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ForValueError(f"{path}: not a regular file (a folder, pipe or device); give the values file itself")
    if not path.is_file():
        raise ForValueError(f"{path}: no such values file; write one with 'forvalue estimate ... -o FILE.parquet'")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif suffix == ".csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types={"id": pa.string()}))
        elif suffix == ".jsonl":
            table = _read_values_jsonl(path)
        else:
            raise ForValueError(f"{path}: unknown values format '{path.suffix}'; use .parquet, .csv or .jsonl")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ForValueError(f"{path}: not a readable {suffix[1:]} values file ({str(exc).splitlines()[0]})") from None
    for c in ("id", column):
        if c not in table.column_names:
            raise ForValueError(f"{path}: field '{c}': missing column (has: {', '.join(table.column_names)})")
    values = table.column(column)
    if not pa.types.is_floating(values.type) and not pa.types.is_integer(values.type):
        raise ForValueError(f"{path}: field '{column}': expected numbers, got {values.type}")
    if values.null_count or not np.isfinite(values.to_numpy(zero_copy_only=False).astype(np.float64)).all():
        raise ForValueError(f"{path}: field '{column}': missing or non-finite values")
    ids = table.column("id").cast(pa.string()).to_pylist()
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ForValueError(f"{path}: field 'id': duplicate id '{dup}'")
    return table.set_column(table.column_names.index("id"), "id", pa.array(ids, pa.string()))


def select_by_values(
    values: str | Path,
    data: Sequence[str | Path],
    top: str | None = None,
    drop_bottom: str | None = None,
    output: str | Path | None = None,
    data_config: DataConfig = DataConfig(),
    column: str = "value",
) -> Selection:
    """Training rows of ``data`` chosen by estimated values, best first (as :meth:`forvalue.Audit.select`).

    Example
    -------
    >>> st = forvalue.open(store_path)
    >>> _ = st.audit([validation_path], "v1", forvalue.AuditConfig(progress=False)).distill("vm")
    >>> _ = forvalue.estimate([train_path], "vm", output="values.parquet")
    >>> forvalue.select_by_values("values.parquet", [train_path], top="25%", output="subset.jsonl")
    Selection(3 of 12 samples -> subset.jsonl)
    """
    from forvalue.audit import parse_amount
    from forvalue.indexer.data import check_paths, iter_samples
    from forvalue.present.output import write_jsonl_atomic
    from forvalue.storage.files import check_outputs

    if (top is None) == (drop_bottom is None):
        raise ForValueError("give exactly one of --top or --drop-bottom")
    check_outputs({"output": (output, (".jsonl",))}, [values, *data])
    table = read_values(values, column)
    ids = table.column("id").to_pylist()
    v = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.argsort(-v, kind="stable")
    n = len(ids)
    keep = (
        order[: parse_amount(top, n)] if top is not None else order[: n - parse_amount(drop_bottom, n, "--drop-bottom")]
    )
    wanted = {ids[j]: k for k, j in enumerate(keep)}
    check_paths(data)
    out: list[dict | None] = [None] * len(keep)
    for s in iter_samples(data, data_config):
        k = wanted.get(s.id)
        if k is not None and out[k] is None:
            row = {"id": s.id, "prompt": s.prompt, "response": s.response, "text": s.text, "label": s.label}
            if s.messages is not None:  # a conversation: its turns as TRL messages, the prompt's turns apart
                turns = [{"role": r, "content": c} for r, c in s.messages]
                if s.context_turns:
                    row.update(prompt=turns[: s.context_turns], completion=turns[s.context_turns :])
                else:
                    row["messages"] = turns
            out[k] = {key: val for key, val in row.items() if val is not None}
    missing = [ids[j] for k, j in enumerate(keep) if out[k] is None]
    if missing:
        raise ForValueError(
            f"{len(missing)} selected ids are not in the data files (e.g. '{missing[0]}'); give the "
            "files the values were estimated from (same --id-column)"
        )
    if output is not None:
        write_jsonl_atomic(out, output)
    return Selection(out, total=n, output=Path(output) if output is not None else None)
