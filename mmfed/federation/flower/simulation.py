"""`mmfed train engine=flower`: a `Run` whose clients run on Flower's simulation engine (Ray).

The ServerApp runs in a thread of this process around the already built `Run` (so config and run
folder errors surface before Ray starts, and the run folder is written exactly as the embedded
engine writes it); one virtual SuperNode per client, `partition-id` = the client's index, each
message handled by a Ray actor with `flower.num_cpus` / `flower.num_gpus`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from mmfed.federation.flower.apps import client_app
from mmfed.federation.flower.engine import FlowerEngine, FlowerSetupError

if TYPE_CHECKING:
    from mmfed.federation.run import Run

log = logging.getLogger("mmfed")


def simulate(run: Run) -> dict[str, Any]:
    """Train `run` on Flower's simulation engine; returns its summary (as `Run.train` does)."""
    engine = run.engine
    if not isinstance(engine, FlowerEngine):
        raise FlowerSetupError(
            f"simulate() needs a Run built with engine=flower, not {type(engine).__name__}"
        )
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        del context  # everything comes from the Run
        engine.bind(grid, expected_nodes=len(run.clients))
        result["summary"] = run.train()

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if run.quiet:  # Flower's INFO lines and its notice that run_simulation is deprecated
        flwr_log.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(run.clients),
            backend_config=engine.settings.backend_config(),  # type: ignore[arg-type]
            verbose_logging=engine.settings.verbose,
        )
    finally:
        flwr_log.setLevel(level)
    if "summary" not in result:
        raise FlowerSetupError("the Flower simulation stopped before the run finished (see Flower's log)")
    return result["summary"]
