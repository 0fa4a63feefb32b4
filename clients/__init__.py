"""fedmm's Flower ClientApp (component ``clients.app:app``)."""
