"""The router: the baton.v1.Router gRPC service and its client library."""
