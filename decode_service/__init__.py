"""Decode worker: a gRPC server over BATON's running batch."""
