"""Run an mmfed federation on Flower (flwr 1.41): simulation (Ray) and SuperLink/SuperNode deployment.

The same `Server` stages and the same client function as the embedded engine; only the transport
differs. `settings` (no flwr import, registered as the `flower` config group), `records` (Payload /
Reply / client state <-> Flower records), `engine` (`FlowerEngine`: one Message per client through a
`Grid`), `apps` (the Flower `ClientApp` and `ServerApp`), `simulation` (`mmfed train engine=flower`).
"""
