"""An OpenAI-compatible HTTP API in front of the baton router (which it calls over gRPC).

    python -m router.http_gateway --router 127.0.0.1:50051 --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}'

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streaming over SSE with
`"stream": true`), GET /v1/models, GET /health (200 when the router is SERVING, else 503),
GET /metrics (Prometheus text), POST /tokenize and /detokenize, GET /version, GET /openapi.json.
A parameter that would change the output and that baton does not honour gets 400 naming it
(unsupported.py), a model name this server does not serve 404 model_not_found. Errors are
OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}` with 400 (bad input), 401 (missing or wrong
bearer token when the gateway has one), 408 (body too slow), 413 (body or request too large),
429 (router queue full), 503 (no live worker / router unreachable / too many connections).
See docs/http.md.

Modules, one concept each: schemas (request bodies, checks and ranges), unsupported (the parameters
refused), errors (APIError, the gRPC -> HTTP map), gateway (router channels, served model name,
tokenizer, chat prompts), streaming (responses and SSE), app (routes, the body limit, the OpenAPI
document), config (HttpLimits and the shared flags), server (uvicorn, CLI).
"""
# Imported on first use (PEP 562), so that `router.http_gateway.config` (the flags `baton up` parses)
# comes without FastAPI or router/metrics.py: `baton up --api-servers N` chooses where metrics are kept
# after parsing its flags and before the first metric is made (deploy/up.py).
_EXPORTS = {"create_app": "app", "HttpLimits": "config", "Gateway": "gateway", "plain_chat_prompt": "gateway",
            "ChatMessage": "schemas", "GatewayHandle": "server", "main": "server", "start_gateway": "server"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
