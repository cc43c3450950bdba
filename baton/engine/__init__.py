"""The engine: everything that runs the model, apart from the plumbing every process shares
(baton/: gRPC helpers, wire, errors, signals, request and sampling types). Nothing is imported
here, so a module that needs only engine.config (the CLI's flags) loads no torch.

    engine.py        Engine: prefill and decode in one process, one step at a time
    loop.py          EngineLoop: the engine on its own thread; other threads reach it only here
    scheduler.py     admission: who joins, which prompts start, which pieces this step (no model)
    step_budget.py   how many prompt tokens a step carries, from measured step costs
    batch.py         DecodeBatch: the running batch, rows joining and leaving between steps
    prefill.py       Prefiller: a query alone -> its first token and K/V
    cache.py         BatchKVCache: the batch's K/V, allocated once, rows right-aligned
    runner.py        ModelRunner: the only module that runs the model
    decode_graphs.py the decode step over static buffers (CUDA graphs on a GPU)
    sampler.py       every row's next token at once, on the device
    prefix_cache.py  K/V of prompt prefixes kept for later prompts
    models/          one module per architecture family
    config.py        EngineConfig
"""
