"""Vision-language valuation on the generated shapes/captions task (tools.image_task).

Builds a store of the training images + captions, queries it with the test images, and
reports index/query time, same-class retrieval (AUC, recall at class size) and, on the
mislabeled variants, detection AUC of flipped captions (cosine scores, max over the
validation samples, lowest = flagged; as ``forvalue audit run --normalize cosine --flag-by max``).

Without ``--model`` it runs a tiny random-initialised Qwen2-VL built offline
(``tools.tiny_models.make_vlm_dir``, the one the tests use): that checks plumbing and cost,
not quality. With ``--model`` pointing at a local Qwen2.5-VL-3B-Instruct folder (and
``--device cuda``) it is the paper's setting.

    python -m tools.bench vlm --out DIR [-- --model /models/Qwen2.5-VL-3B-Instruct --device cuda]
    python -m tools.bench_vlm [--model ...] [--out table.md]   # the same suite on its own
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from forvalue.api import build_index, run_query
from forvalue.indexer.data import iter_samples
from forvalue.metrics import class_retrieval, roc_auc
from forvalue.schemas.config import BuildConfig, DataConfig, EncodeConfig, ModelConfig, QueryConfig
from tools.common import add_common_args, apply_threads, emit, machine_info, quiet_transformers
from tools.image_task import generate


def blank_images(train: Path, test: Path, size: int) -> None:
    """Control: point every row at one grey image, so only the text differs between rows."""
    import json

    from PIL import Image

    Image.new("RGB", (size, size), (128, 128, 128)).save(train.parent / "images" / "blank.png")
    for path in (train, test):
        rows = [{**json.loads(line), "image": "images/blank.png"} for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(model_dir: str, work: Path, args, noise: float, runner=None, control: bool = False):
    folder = work / f"data-{noise}-{'blank' if control else 'shapes'}"
    train, test = generate(folder, args.n_train, args.n_test, args.n_classes, args.size, noise, args.seed)
    if control:
        blank_images(train, test, args.size)
    store = folder / "store"
    data = DataConfig(image_column="image")
    model = ModelConfig(path=model_dir, device=args.device, image_max_pixels=args.image_max_pixels)
    if runner is None:
        from forvalue.indexer.model_runner import load_runner

        runner = load_runner(model)
    cfg = BuildConfig(data=data, model=model, encode=EncodeConfig(top_m=32), batch_size=args.batch_size, progress=False)
    started = time.perf_counter()
    report = build_index([train], store, cfg, runner=runner)
    build_s = time.perf_counter() - started
    q = QueryConfig(progress=False, device=args.device, exact=True)
    res = run_query(store, [test], q, runner=runner, keep_scores=True)
    cos = run_query(
        store,
        [test],
        QueryConfig(progress=False, device=args.device, exact=True, normalize="cosine"),
        runner=runner,
        keep_scores=True,
    )
    rows = {s.id: s for s in iter_samples([train], data)}
    import json

    flipped = {json.loads(line)["id"]: json.loads(line)["flipped"] for line in train.read_text().splitlines()}
    labels = [rows[i].label for i in res.train_ids]
    val_labels = [s.label for s in iter_samples([test], data)]
    retrieval = class_retrieval(res.scores, labels, val_labels) if noise == 0 else None
    is_flipped = np.array([flipped[i] for i in cos.train_ids])
    detection = roc_auc(-cos.scores.max(axis=0), is_flipped) if is_flipped.any() else None
    return runner, {
        "noise": noise,
        "images": "one grey image (control)" if control else "shapes",
        "train": report.written,
        "tokens": report.tokens_scored,
        "build_s": build_s,
        "query_s": res.seconds,
        "retrieval": retrieval,
        "detection": detection,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_vlm", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--model", default=None, help="local VLM folder (default: a tiny random Qwen2-VL built offline)")
    ap.add_argument("--n-train", type=int, default=20)
    ap.add_argument("--n-test", type=int, default=3)
    ap.add_argument("--n-classes", type=int, default=8)
    ap.add_argument("--size", type=int, default=56, help="image side in pixels")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-max-pixels", type=int, default=ModelConfig().image_max_pixels)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-control", action="store_true", help="skip the control runs in which every row has the same grey image"
    )
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            from tools.tiny_models import make_vlm_dir

            model_dir = str(make_vlm_dir(work / "tiny-qwen2vl"))
        runner, results = None, []
        for control in (False,) if args.no_control else (False, True):
            for noise in args.noise:
                runner, result = run(model_dir, work, args, noise, runner, control)
                results.append(result)
    name = "tiny random Qwen2-VL (offline)" if args.model is None else Path(args.model).name
    lines = [
        f"model: {name}; {args.n_classes} classes x {args.n_train} train / {args.n_test} test images of "
        f"{args.size}x{args.size}; {machine_info(args.device)}",
        "",
        "| images | flipped captions | train samples | scored tokens | index build (s) | query, all test images (s) | "
        "same-class AUC | recall | flipped-caption detection AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ret = r["retrieval"]
        auc = f"{ret['auc_mean']:.3f} +- {ret['auc_std']:.3f}" if ret else "-"
        rec = f"{ret['recall_mean']:.3f}" if ret else "-"
        det = f"{r['detection']:.3f}" if r["detection"] is not None else "-"
        lines.append(
            f"| {r['images']} | {r['noise']:.0%} | {r['train']} | {r['tokens']} | {r['build_s']:.1f} | "
            f"{r['query_s']:.2f} | {auc} | {rec} | {det} |"
        )
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
