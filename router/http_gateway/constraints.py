"""The HTTP API's constrained-output fields as one GenerateRequest constraint: OpenAI's
response_format (json_object, json_schema), vLLM's guided_json, guided_regex, guided_choice,
guided_grammar and structured_outputs. At most one per request; a choice becomes an EBNF grammar
of its strings (vLLM's way); whatever cannot be used is a 400 naming the field."""
from __future__ import annotations

import json
from typing import Any

from baton.sampling import choice_grammar
from router.http_gateway.errors import APIError

CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs")


def _response_format(rf: dict) -> dict[str, str]:
    """OpenAI's response_format: json_object is any JSON object, json_schema its `schema`."""
    kind = rf.get("type", "text")
    if kind == "json_object":
        return {"json_schema": '{"type": "object"}'}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema (an object)",
                           param="response_format", code="invalid_value")
        return {"json_schema": json.dumps(schema)}
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                   param="response_format", code="invalid_value")


def _structured_output(so: dict) -> dict[str, str]:
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""
    given = {k: v for k, v in so.items() if v is not None and v is not False}
    if len(given) != 1 or not set(given) <= {"json", "regex", "choice", "grammar", "json_object"}:
        raise APIError(400, "structured_outputs must hold exactly one of json, regex, choice, grammar, "
                       f"json_object; got {sorted(given) or 'none'}", param="structured_outputs", code="invalid_value")
    (key, value), = given.items()
    if key == "json_object":
        return {"json_schema": '{"type": "object"}'}
    return _constraint(key, value, "structured_outputs")


def _constraint(kind: str, value: Any, param: str) -> dict[str, str]:
    """One constraint as the GenerateRequest holds it (a choice as a grammar of its strings)."""
    if kind == "json":
        return {"json_schema": value if isinstance(value, str) else json.dumps(value)}
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise APIError(400, f"{param} must be a non-empty list of non-empty strings", param=param,
                           code="invalid_value")
        return {"grammar": choice_grammar(value)}
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{param} must be a non-empty string", param=param, code="invalid_value")
    return {kind: value}


def _sources(body) -> list[tuple[str, Any]]:
    """The constraint fields the body sets (a response_format of type text sets none)."""
    given = [(name, getattr(body, name)) for name in CONSTRAINT_FIELDS if getattr(body, name) is not None]
    return [(n, v) for n, v in given if not (n == "response_format" and v.get("type", "text") == "text")]


def param(body) -> str:
    """The field that holds the body's constraint, as the API spells it (errors name it)."""
    given = _sources(body)
    return given[0][0] if given else "response_format"


def from_body(body) -> dict[str, str]:
    """json_schema, regex or grammar for the GenerateRequest ({} for free text)."""
    given = _sources(body)
    if len(given) > 1:
        raise APIError(400, f"send one of {', '.join(n for n, _ in given)}: each constrains the output",
                       param=given[1][0], code="invalid_value")
    if not given:
        return {}
    name, value = given[0]
    if name == "structured_outputs":
        return _structured_output(value)
    if name == "response_format":
        return _response_format(value)
    return _constraint(name.removeprefix("guided_"), value, name)
