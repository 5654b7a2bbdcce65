"""Vision adapters, one module per model family (listed in mmserve/families.py)."""
