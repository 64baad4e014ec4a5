"""`mmfed train engine=flower`: a `Run` whose clients run on Flower's simulation engine (Ray).

The ServerApp runs in a thread of this process around the already built `Run` (so config and run
folder errors surface before Ray starts, and the run folder is written exactly as the embedded
engine writes it); one virtual SuperNode per client, `partition-id` = the client's index, each
message handled by a Ray actor with `flower.num_cpus` / `flower.num_gpus`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from mmfed.federation.flower.apps import client_app
from mmfed.federation.flower.engine import FlowerEngine, FlowerSetupError

if TYPE_CHECKING:
    from mmfed.federation.run import Run

log = logging.getLogger("mmfed")


@contextlib.contextmanager
def flower_logging(verbose: bool) -> Iterator[None]:
    """Flower and Ray quiet unless ``flower.verbose=true``; as they were afterwards.

    Quiet: Flower's logger shows errors only (its DEBUG lines, and the notice that `run_simulation`
    is deprecated, which a user cannot act on) and no longer propagates to the root logger as well
    as printing itself (each line came twice); Ray's FutureWarning about accelerator variables is
    hidden, and so are mmfed's node discovery lines (one per simulated node, all on this machine).
    Verbose: Flower's DEBUG log (its own handler) and the node lines.
    """
    flwr_log, nodes_log = logging.getLogger("flwr"), logging.getLogger("mmfed.flower")
    saved = (flwr_log.level, flwr_log.propagate, nodes_log.level)
    flwr_log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    flwr_log.propagate = False
    nodes_log.setLevel(logging.INFO if verbose else logging.WARNING)  # "SuperNode N hosts ..." per node
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.filterwarnings("ignore", message=".*future versions of Ray", category=FutureWarning)
            yield
    finally:
        flwr_log.setLevel(saved[0])
        flwr_log.propagate = saved[1]
        nodes_log.setLevel(saved[2])


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

    verbose = engine.settings.verbose
    backend_config = engine.settings.backend_config()
    if not verbose:  # Ray's own worker lines ("Manually terminating ClientAppActor") stay in Ray's logs
        backend_config["init_args"].setdefault("log_to_driver", False)
        backend_config["init_args"].setdefault("logging_level", "ERROR")
    with flower_logging(verbose):
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(run.clients),
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    if "summary" not in result:
        raise FlowerSetupError("the Flower simulation stopped before the run finished (see Flower's log)")
    return result["summary"]
