"""servekit with other systems: replicas on a Ray cluster (``ray``)."""
