"""Securing a federation: secure aggregation (Flower's SecAgg+), the updates sites send
under it, TLS certificates and SuperNode authentication keys."""
