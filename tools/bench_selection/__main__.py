"""``python -m tools.bench_selection``: the suite's own command line (``python -m tools.bench selection`` runs it)."""

from tools.bench_selection import main

main()
