"""``forvalue demo``: the built-in end-to-end job on a generated task with the default model."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--workdir", default="runs/demo", show_default=True, type=click.Path(), help="Where data, store and results go.")
@click.option("--train-per-class", default=20, show_default=True, type=click.IntRange(min=1),
              help="Training samples per class (10 classes).")
@click.option("--model", "model_path", default=None, help="Model (default: SmolLM2-135M-Instruct).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def demo(workdir, train_per_class, model_path, device):
    """Generate the sentence-transformation task, build a store, query it and print the evidence."""
    from forvalue.demo import run_demo

    run_demo(workdir, train_per_class=train_per_class, model_path=model_path, device=device, echo=click.echo)
