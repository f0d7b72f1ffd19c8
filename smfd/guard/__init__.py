"""Guard stage: retention probes, their scoring and the verdict that accepts or rolls back an update."""
