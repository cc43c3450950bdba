"""Ray deployment: workers as actors on a local or existing cluster, scaled per role."""
