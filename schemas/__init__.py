"""Table schemas, the store manifest, typed settings and exceptions."""
