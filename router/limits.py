"""Request limits and validation at the router: every field checked, every message names
the field and its allowed range."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from baton.errors import InvalidArgument
from baton.sampling import SamplingParams

_CONTEXT = "the model's context: max_position_embeddings in its config.json"


@dataclass(frozen=True)
class Limits:
    # None = the model's context (for_context() fills them in when the router knows the model).
    max_prompt_tokens: int | None = None   # the prompt plus max_new_tokens must fit the context as well
    max_new_tokens: int | None = None
    max_stop_strings: int = 8
    max_stop_length: int = 64
    max_prompt_chars: int = 64 * 1024      # a text prompt's characters (before tokenizing); token ids are not
    max_request_id_length: int = 128

    def for_context(self, context: int) -> Limits:
        """These limits with the token caps left unset taken from the model's context."""
        return dataclasses.replace(self, max_prompt_tokens=self.max_prompt_tokens or context,
                                   max_new_tokens=self.max_new_tokens or context)


def add_args(p) -> None:
    """Command-line flags for the limits and the router's capacity (router and `baton up`); each help
    says what the limit does and shows its default."""
    from router.config import RouterConfig
    d, c = Limits(), RouterConfig()
    g = p.add_argument_group("request limits")
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="longer prompts get INVALID_ARGUMENT (HTTP 400); the prompt plus max_new_tokens must also "
                        f"fit the context (default: {_CONTEXT})")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="largest max_new_tokens (HTTP max_tokens) a request may ask for; more gets INVALID_ARGUMENT "
                        f"(HTTP 400) (default: {_CONTEXT})")
    g.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help="characters a text prompt may have before it is tokenized; more gets INVALID_ARGUMENT "
                        "(HTTP 400) (default: %(default)s)")
    g.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help="stop strings a request may give (default: %(default)s)")
    g.add_argument("--max-stop-length", type=int, default=d.max_stop_length,
                   help="characters per stop string (default: %(default)s)")
    g.add_argument("--max-queue", type=int, default=c.max_queue,
                   help="accepted requests not yet decoding; more get RESOURCE_EXHAUSTED (HTTP 429) "
                        "(default: %(default)s)")
    g.add_argument("--max-running", type=int, default=c.max_running,
                   help="requests in flight (waiting or decoding); more get RESOURCE_EXHAUSTED (HTTP 429) "
                        "(default: %(default)s)")
    g.add_argument("--max-message-bytes", type=int, default=c.max_message_bytes,
                   help="largest gRPC message accepted, bytes; a larger request gets RESOURCE_EXHAUSTED "
                        "(HTTP 413) (default: %(default)s)")
    g.add_argument("--worker-silence-s", type=float, default=c.worker_silence_s,
                   help="a decode worker that sends nothing on a request's stream (no token, no keep-alive) for "
                        "this many seconds is treated as failed and the request migrates to another one "
                        "(default: %(default)s)")
    g.add_argument("--worker-wait-s", type=float, default=c.worker_wait_s,
                   help="with no live worker for a request, wait this many seconds for one before UNAVAILABLE "
                        "(default: %(default)s)")


def from_args(a) -> Limits:
    return Limits(max_prompt_tokens=a.max_prompt_tokens, max_new_tokens=a.max_new_tokens,
                  max_stop_strings=a.max_stop_strings, max_stop_length=a.max_stop_length,
                  max_prompt_chars=a.max_prompt_chars)


def validate_sampling(limits: Limits, r, default_max_new_tokens: int) -> SamplingParams:
    """A GenerateRequest's basic sampling fields, checked against the router's limits, as SamplingParams
    (baton.wire.sampling_from_request adds the logit processors and checks every field's range)."""
    max_new_tokens = r.max_new_tokens or default_max_new_tokens
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise InvalidArgument(f"max_new_tokens must be in [1, {limits.max_new_tokens}], got {max_new_tokens}",
                              field="max_new_tokens")
    if not 0 <= r.top_k <= 1_000_000:
        raise InvalidArgument(f"top_k must be in [0, 1000000] (0 = off), got {r.top_k}", field="top_k")
    if len(r.stop) > limits.max_stop_strings:
        raise InvalidArgument(f"at most {limits.max_stop_strings} stop strings, got {len(r.stop)}", field="stop")
    for s in r.stop:
        if not 1 <= len(s) <= limits.max_stop_length:
            raise InvalidArgument(f"each stop string must have 1 to {limits.max_stop_length} characters, got {len(s)}",
                                  field="stop")
    kw = dict(max_new_tokens=max_new_tokens, temperature=float(r.temperature), top_p=float(r.top_p or 1.0),
              top_k=r.top_k, min_p=float(r.min_p), stop=tuple(r.stop), ignore_eos=r.ignore_eos)
    if r.HasField("seed"):
        kw["seed"] = r.seed
    return SamplingParams(**kw)


def check_prompt(limits: Limits, num_tokens: int, max_new_tokens: int, context: int) -> None:
    """The prompt is within --max-prompt-tokens and, with max_new_tokens, within the model's context;
    the message names the prompt, which is what the client has to shorten."""
    if num_tokens == 0:
        raise InvalidArgument("prompt must not be empty", field="prompt")
    if num_tokens > limits.max_prompt_tokens:
        raise InvalidArgument(f"the prompt has {num_tokens} tokens; at most {limits.max_prompt_tokens} allowed "
                              "(--max-prompt-tokens)", field="prompt")
    if num_tokens + max_new_tokens > context:
        raise InvalidArgument(f"the prompt has {num_tokens} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                              f"the model's context of {context} tokens", field="prompt")


def check_prompt_chars(limits: Limits, prompt: str) -> None:
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument(f"the prompt has {len(prompt)} characters; at most {limits.max_prompt_chars} allowed "
                              "(--max-prompt-chars)", field="prompt")


def check_request_id(limits: Limits, request_id: str) -> None:
    if len(request_id) > limits.max_request_id_length or not request_id.isprintable():
        raise InvalidArgument(f"request_id must be printable and at most {limits.max_request_id_length} characters",
                              field="request_id")
