"""Device discovery, GPU tiers, the memory model and the training plan."""
