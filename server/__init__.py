"""fedmm's Flower ServerApp (component ``server.app:app``)."""
