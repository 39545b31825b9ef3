"""Per-workload jobs: how to split the work, what a host runs, how to check and store a result."""
