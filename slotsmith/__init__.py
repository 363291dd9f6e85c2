"""slotsmith: train, splice and verify disjoint slots of a Wan video DiT."""

__version__ = "0.1.0"
