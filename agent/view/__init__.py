"""The central view: ``nodemesh stat``, ``edges`` and ``top`` over the whole mesh's metrics."""
