"""Running probes: local execution in batches, run folders and their locks, sweeps and Slurm job arrays."""
