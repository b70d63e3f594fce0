"""``python -m forvalue``: the same as the ``forvalue`` command."""

from forvalue.cli import main

if __name__ == "__main__":
    main()
