"""Storage: the only code that touches Lance (and FAISS)."""
