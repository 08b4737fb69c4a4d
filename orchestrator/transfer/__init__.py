"""Delta transfer: learn what changed on the node, fetch only that, and
compose a new complete archive from the previous one (storage/tgz)."""
