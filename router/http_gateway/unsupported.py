"""The parameters that would change a completion and that baton does not honour (yet): the one table.

A request that sets one of them to anything but a value that changes nothing gets 400 with
`param` naming it and code `unsupported_parameter`, never a completion that silently differs from
what the client asked for. Fields that do not change the output (`user`, `metadata`, `store`,
`service_tier`, `stream_options`, `parallel_tool_calls`, vLLM's `priority`, ...) are accepted, and
other unknown fields are ignored. Honouring one of these means removing its row (and adding the
field to the request model in schemas.py).
"""
from __future__ import annotations

import json
import reprlib
from typing import Any

from router.http_gateway.errors import APIError

# name -> (the values that change nothing, besides null / absent; what baton would have to do)
Rule = tuple[tuple[Any, ...], str]

# Honoured (in schemas.py, checked by baton.sampling.SamplingParams.validate): n, logprobs, top_logprobs,
# presence_penalty, frequency_penalty, logit_bias, response_format, and vLLM's repetition_penalty,
# min_tokens, min_p, guided_json, guided_regex, guided_choice, guided_grammar and structured_outputs; tools and
# tool_choice "auto" / "none" (tools.py).
COMMON: dict[str, Rule] = {
    # OpenAI
    "echo": ((False,), "echo the prompt"),
    # vLLM's extra sampling fields
    "use_beam_search": ((False,), "beam search"),
    "length_penalty": ((1,), "beam search"),
    "stop_token_ids": (([],), "stop on extra token ids"),
    "include_stop_str_in_output": ((False,), "keep the stop string in the text"),
    "skip_special_tokens": ((True,), "print special tokens"),
    "spaces_between_special_tokens": ((True,), "change how special tokens are spaced"),
    "bad_words": (([],), "ban words"),
    "allowed_token_ids": ((), "restrict the vocabulary"),
    "logits_processors": (([],), "run custom logits processors"),
    "prompt_logprobs": ((), "return the prompt's log-probabilities"),
    "truncate_prompt_tokens": ((), "truncate the prompt"),
}

CHAT: dict[str, Rule] = {
    **COMMON,
    "functions": (([],), "call functions (the deprecated form: send tools)"),
    "function_call": (("none",), "call functions (the deprecated form: send tools and tool_choice)"),
    "modalities": ((["text"],), "answer in other modalities than text"),
    "audio": ((), "answer with audio"),
    "reasoning_effort": ((), "reason (no reasoning model is served)"),
    "web_search_options": ((), "search the web"),
    "add_generation_prompt": ((True,), "render the chat without the assistant's turn"),
    "continue_final_message": ((False,), "continue the last message"),
    "add_special_tokens": ((False,), "add special tokens to the rendered chat"),
    "chat_template": ((), "use another chat template"),
    "chat_template_kwargs": (({},), "pass arguments to the chat template"),
    "documents": (([],), "pass documents to the chat template"),
}

COMPLETIONS: dict[str, Rule] = {
    **COMMON,
    "best_of": ((1,), "return the best of several samples"),
    "suffix": (("",), "insert text (fill in the middle)"),
    "add_special_tokens": ((True,), "encode the prompt without special tokens"),
}


def _same(v: Any, ok: Any) -> bool:
    if isinstance(v, bool) or isinstance(ok, bool):   # True is not 1 here, nor False 0
        return v is ok
    return v == ok


def check(data: dict, rules: dict[str, Rule]) -> None:
    """APIError(400) naming the first field of `data` that asks for what baton does not do."""
    for name, value in data.items():
        rule = rules.get(name)
        if rule is None or value is None or any(_same(value, ok) for ok in rule[0]):
            continue
        accepted = " or ".join(json.dumps(ok) for ok in rule[0])
        raise APIError(400, f"{name} is not supported: baton does not {rule[1]} yet; leave {name} out"
                       + (f" or send {accepted}" if accepted else "") + f" (got {reprlib.repr(value)})",
                       param=name, code="unsupported_parameter")
