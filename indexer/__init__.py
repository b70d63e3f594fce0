"""Indexer: data loading, model runner, error sparsifier and the build pipeline."""
