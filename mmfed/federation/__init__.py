"""Client runtime, server runtime, the embedded engine, client-state store, checkpoints and the run."""
