"""The ``forvalue`` command line: each command parses options, makes one API call and prints.

Options are generated from the config dataclasses (:mod:`forvalue.cli.options`); one module
per command group: :mod:`~forvalue.cli.index`, :mod:`~forvalue.cli.query`,
:mod:`~forvalue.cli.audit` (with ``select``), :mod:`~forvalue.cli.demo`.
"""

from __future__ import annotations

import click

from forvalue.cli import audit, demo, distill, explain, index, query
from forvalue.cli.options import Group, quiet_transformers
from forvalue.cli.paths import guard_paths


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="forvalue")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an error (also FORVALUE_DEBUG=1).")
def main(debug: bool) -> None:
    """Forward-only data valuation (For-Value) for LLMs and VLMs.

    \b
    1. forvalue index build train.jsonl --store runs/store     (one forward pass, stored in Lance)
    2. forvalue query --store runs/store -v val.jsonl --top-k 10 -o top.jsonl
    3. forvalue audit run --store runs/store -v val.jsonl --name v1   (value the whole training set)
    4. forvalue select --store runs/store --audit v1 --top 50% -o subset.jsonl
    5. forvalue explain --store runs/store -v val.jsonl --train-id ID -o why.html   (the score, token by token)
    6. forvalue demo                                            (everything on a built-in task)

    A score S(v, i) = <G_v, G_i> with G = sum_k e_k h_k^T says how much training sample i
    raises the likelihood of validation sample v; larger is more valuable. Every error is one
    line on stderr with exit status 2.
    """
    quiet_transformers()


main.add_command(index.index)
main.add_command(query.query_command)
main.add_command(explain.explain_command)
main.add_command(audit.audit)
main.add_command(audit.select)
main.add_command(demo.demo)
main.add_command(distill.distill_command)
main.add_command(distill.estimate_command)
guard_paths(main)  # the output policy (forvalue.cli.paths) runs before every command

if __name__ == "__main__":  # pragma: no cover
    main()
