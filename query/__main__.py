"""``python -m forvalue``: the same as the ``forvalue`` command (whose entry point is :func:`run`)."""

import sys


def run() -> None:
    """The ``forvalue`` program. A Ctrl-C while the CLI is still being imported is one line and status 130, as it
    is once the command runs (:mod:`forvalue.cli.options`), not a traceback. The C allocator keeps freed memory
    for the next large array (:mod:`forvalue.engine.allocator`), set before any thread starts."""
    from forvalue.engine.allocator import keep_freed_memory

    keep_freed_memory()
    try:
        from forvalue.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted before the command started; nothing was written\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
