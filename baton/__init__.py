"""baton: BATON dynamic re-batching LLM serving."""
