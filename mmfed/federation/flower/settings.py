"""The `flower` config group: how `engine=flower` runs (kept free of flwr so composing stays cheap)."""

from __future__ import annotations

from mmfed.config import check_positive, register


@register("flower", "default")
class FlowerSettings:
    """Flower's knobs, defaults written once here (see `mmfed.config.register`).

    num_cpus / num_gpus: resources of one client in the simulation (a Ray actor per concurrent
    client, so a 2-core machine with num_cpus=1 trains two clients at a time; num_gpus=0.5 puts two
    clients on one GPU, with `device=cuda`). ray_num_cpus: CPUs Ray may use in all (null: every core).
    connect_timeout: seconds to wait for SuperNodes hosting every client before the first round
    (deployment; in simulation they are there at once). wait_grace: seconds added to a stage's wait
    for replies on top of client_timeout x clients (process start, imports, data on the node).
    poll_interval: seconds between pulls of replies. verbose: Flower's DEBUG logs in simulation.
    """

    def __init__(
        self,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        ray_num_cpus: int | None = None,
        connect_timeout: float = 120.0,
        wait_grace: float = 60.0,
        poll_interval: float = 0.1,
        verbose: bool = False,
    ) -> None:
        check_positive("num_cpus", num_cpus)
        check_positive("num_gpus", num_gpus, strict=False)
        if ray_num_cpus is not None:
            check_positive("ray_num_cpus", ray_num_cpus)
        check_positive("connect_timeout", connect_timeout)
        check_positive("wait_grace", wait_grace, strict=False)
        check_positive("poll_interval", poll_interval)
        self.num_cpus, self.num_gpus, self.ray_num_cpus = float(num_cpus), float(num_gpus), ray_num_cpus
        self.connect_timeout, self.wait_grace = float(connect_timeout), float(wait_grace)
        self.poll_interval, self.verbose = float(poll_interval), verbose

    def backend_config(self) -> dict[str, dict[str, float | int | bool | str]]:
        """Flower's simulation `backend_config`: per-client resources and Ray's init arguments."""
        init_args: dict[str, float | int | bool | str] = {}
        if self.ray_num_cpus is not None:
            init_args["num_cpus"] = self.ray_num_cpus
        return {
            "client_resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "init_args": init_args,
        }
