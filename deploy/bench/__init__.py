"""`baton bench`: one workload through seven batching systems, side by side."""
