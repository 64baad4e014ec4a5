"""mmfed's Flower app: the ServerApp and ClientApp live in the installed `mmfed` package."""

from mmfed.federation.flower.apps import client_app, server_app

__all__ = ["client_app", "server_app"]
