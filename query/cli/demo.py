"""``forvalue demo``: the built-in end-to-end job on a generated task with the default model."""

from __future__ import annotations

import click

from forvalue.cli.options import config_options, make
from forvalue.schemas.config import DemoConfig, ModelConfig


@click.command("demo")
@config_options(DemoConfig)
@config_options(ModelConfig, only=("path", "device"))
def demo(**kw):
    """Generate the sentence-transformation task, build a store, query it and print the evidence."""
    from forvalue.demo import run_demo

    run_demo(make(DemoConfig, kw), make(ModelConfig, kw), echo=click.echo)
