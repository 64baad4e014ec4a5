"""Where the engine is chosen: `train(cfg)` runs a composed config on the engine it names.

Above `federation.run` and `federation.flower` (it imports both; neither imports it), so the run
loop never imports the Flower simulation and the Flower apps never import the CLI.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from mmfed.federation.run import Run


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train `cfg` in its run folder; returns the summary. ``engine=flower`` runs the rounds inside
    Flower's simulation (its ServerApp thread drives the already built `Run`)."""
    run = Run(cfg)
    try:
        if cfg.engine == "flower":
            from mmfed.federation.flower.simulation import simulate

            return simulate(run)
        return run.train()
    finally:
        close = getattr(run.engine, "close", None)
        if close is not None:  # the embedded engine's worker processes
            close()
        run.lock.release()
