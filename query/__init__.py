"""Query: validation encoding, exact scorer, ranking, output and the public API."""
