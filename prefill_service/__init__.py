"""Prefill worker: a gRPC server that prefills prompts and pushes their K/V to decode workers."""
