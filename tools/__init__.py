"""Benchmarks and data tools of the forvalue repository (not part of the installed product).

One runner, ``python -m tools.bench SUITE... --out DIR`` (``--list`` names the suites), over one
module per suite (``tools.bench_build``, ``tools.bench_query``, ...), each also runnable on its own
as ``python -m tools.<module> --help``. Shared machine description, timing and markdown output
live in :mod:`tools.common`. Data tools: ``python -m tools.generate_tasks``,
``python -m tools.make_synthetic_store``, ``python -m tools.requantise_model``. Run from the
repository root (the folder that holds ``tools/``); the product is imported as ``forvalue``.
See tools/README.md.
"""
