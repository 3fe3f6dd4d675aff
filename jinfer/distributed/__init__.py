"""Distribution: the device mesh and the logical-axis sharding rules."""
