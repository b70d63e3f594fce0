"""The built-in end-to-end job behind ``forvalue demo``.

Generates the paper's sentence-transformation task (10 rules), indexes the training
set with the default model, queries it with the held-out samples and prints, for one
validation sample, the training samples that matter most, plus AUC and recall over all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from forvalue.metrics import class_retrieval
from forvalue.schemas.config import BuildConfig, DemoConfig, ModelConfig, QueryConfig
from forvalue.store import build
from forvalue.tasks.text import generate_task, write_jsonl


def run_demo(
    config: DemoConfig = DemoConfig(),
    model: ModelConfig = ModelConfig(),
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the built-in job: generate the sentence-transformation task, build a store, query it, score retrieval.

    Returns
    -------
    dict
        The retrieval metrics (AUC and recall of same-class training samples, mean and std).

    Example
    -------
    >>> small = forvalue.schemas.config.DemoConfig(workdir="demo", train_per_class=2)
    >>> metrics = forvalue.run_demo(small, forvalue.ModelConfig(path=model_path), echo=lambda line: None)
    >>> sorted(metrics)                                 # forvalue demo runs this with SmolLM2 and 20 per class
    ['auc_mean', 'auc_std', 'recall_mean', 'recall_std']
    """
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_per_class = config.train_per_class
    train, test = generate_task(
        "sentence_transformations", n_train=train_per_class, n_test=config.test_per_class, seed=0
    )
    write_jsonl(train, workdir / "train.jsonl")
    write_jsonl(test, workdir / "validation.jsonl")
    echo(f"data: {len(train)} training and {len(test)} validation samples of 10 sentence transformations in {workdir}")
    store = build([workdir / "train.jsonl"], workdir / "store", BuildConfig(model=model))
    report = store.last_build
    echo(
        f"store: {report.total_rows} samples in {workdir / 'store'} (this run wrote {report.written} in "
        f"{report.seconds:.1f}s)"
    )
    result = store.query(
        [workdir / "validation.jsonl"],
        QueryConfig(top_k=5, include_text=True, device=model.device),
        keep_scores=True,
    )
    result_path = workdir / "top5.jsonl"
    from forvalue.present.output import write_table

    write_table(result.top, result_path)
    first = test[0]
    echo("")
    echo(f"validation sample [{first['label']}]: {first['prompt']}{first['response']}".replace("\n", " "))
    echo("most valuable training samples:")
    for row in result.top.to_pylist()[:5]:
        mark = "same rule" if row["train_label"] == first["label"] else "OTHER rule"
        echo(
            f"  #{row['rank']}  score {row['score']:10.1f}  [{mark}: {row['train_label']}]  {row['train_text']!r}"[:220]
        )
    labels = {r["id"]: r["label"] for r in train}
    metrics = class_retrieval(result.scores, [labels[i] for i in result.train_ids], [r["label"] for r in test])
    echo("")
    echo(
        f"over all {len(test)} validation samples: AUC {metrics['auc_mean']:.3f} +- {metrics['auc_std']:.3f}, "
        f"recall {metrics['recall_mean']:.3f} +- {metrics['recall_std']:.3f} (1.0 = the top-{train_per_class} are all "
        "the same rule)"
    )
    echo(f"full top-5 lists: {result_path}")
    return metrics
