"""``hydra/launcher=zsharp_streams``: a sweep's parallel trials as threads of one process."""
