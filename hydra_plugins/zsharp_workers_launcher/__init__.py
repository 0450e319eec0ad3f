"""``hydra/launcher=zsharp_workers``: each sweep worker in a process of its own."""
