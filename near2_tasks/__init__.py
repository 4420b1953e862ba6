"""near2: nested-embedding semantic search, trained, gated and served."""
