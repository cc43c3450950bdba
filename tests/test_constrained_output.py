"""Constrained decoding (json_schema, regex, grammar; the HTTP API's response_format, guided_json,
guided_regex, guided_choice, guided_grammar and structured_outputs): the output follows its
constraint, token for token what an independent reference gives (transformers' forward pass,
xgrammar's matcher, argmax), whatever the batch-mates, in process, in both topologies and through
the HTTP API; constraints nobody can use are refused naming the field."""
from __future__ import annotations

import json
import random
import re

import openai
import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.grammar import Grammars, RowGrammar, check
from baton.model_loader import load_model
from baton.request import FinishReason
from baton.sampling import InvalidParam, SamplingParams, choice_grammar
from loopback import loopback_cluster
from tiny_model import EOS, save_char_tokenizer, save_tiny

SCHEMA = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"},
                                                      "pick": {"enum": ["red", "green", "blue"]}},
                     "required": ["ok", "pick"], "additionalProperties": False})
REGEX = "[0-9]{3}-[a-z]{2,4}"
CHOICES = ["red", 'say "hi"', "blue\\green"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    save_char_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, "float64", "cpu")


def reference(model, prompt: list[int], constraint: tuple[str, str], max_new_tokens: int) -> list[int]:
    """Greedy under the constraint (kind, text), computed apart from the engine: a full forward pass per token."""
    import xgrammar as xgr
    vocab = model.model.config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(model.tokenizer, vocab_size=vocab, stop_token_ids=sorted(model.eos_ids))
    compiler, (kind, text) = xgr.GrammarCompiler(info), constraint
    compiled = {"json_schema": lambda: compiler.compile_json_schema(text, any_whitespace=False),
                "regex": lambda: compiler.compile_regex(text), "grammar": lambda: compiler.compile_grammar(text)}[kind]()
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    ids, out = list(prompt), []
    while len(out) < max_new_tokens:
        with torch.no_grad():
            logits = model.model(torch.tensor([ids])).logits[0, -1]
        matcher.fill_next_token_bitmask(bitmask)
        allowed = torch.tensor([bool(int(bitmask[0, t // 32]) >> (t % 32) & 1) for t in range(vocab)])
        token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
        out.append(token)
        if token in model.eos_ids:
            break
        assert matcher.accept_token(token)
        ids.append(token)
    return out


def _follows(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"ok", "pick"} and isinstance(value["ok"], bool) and value["pick"] in ("red", "green", "blue")


def test_engine_output_follows_its_constraint_and_equals_the_reference_whatever_the_batch_mates(model):
    rng = random.Random(3)
    constraints = [("json_schema", SCHEMA), None, ("regex", REGEX), ("json_schema", '{"type": "object"}'), None,
                   ("grammar", choice_grammar(CHOICES)), ("json_schema", SCHEMA), None, ("regex", REGEX)]
    prompts = [[rng.randrange(3, 98) for _ in range(rng.randint(2, 30))] for _ in constraints]
    # 3 rows for 9 queries: constrained and free rows join and leave around each other
    engine = Engine(model, EngineConfig(max_batch=3, max_queue=len(prompts)))
    done = engine.generate(prompts, [SamplingParams(max_new_tokens=40, **dict([c] if c else []))
                                     for c in constraints])
    for r, p, c in zip(done, prompts, constraints):
        if not c:
            continue
        assert r.output_ids == reference(model, p, c, 40), r.request_id
        text = model.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        if c[1] == SCHEMA:   # bounded: it must end, and follow the schema
            assert r.finish_reason is FinishReason.STOP and _follows(text), text
        elif c[0] == "regex":
            assert r.finish_reason is FinishReason.STOP and re.fullmatch(REGEX, text), text
        elif c[0] == "grammar":
            assert r.finish_reason is FinishReason.STOP and text in CHOICES, text
        elif r.finish_reason is FinishReason.STOP:   # any object: a random model may still be writing one
            assert isinstance(json.loads(text), dict), text


def test_a_row_grammar_rebuilt_from_its_output_masks_as_the_one_that_followed_every_step(model):
    """What a migrated request's new worker does: the matcher replays the output so far."""
    grammars = Grammars(model.tokenizer, model.model.config.vocab_size, model.eos_ids)
    compiled = grammars.compile("json_schema", SCHEMA)
    output = model.tokenizer.encode('{"ok": true, "pick": "gr', add_special_tokens=False)   # xgrammar's separators
    stepwise = RowGrammar(compiled, 256)
    for n in range(len(output) + 1):
        mask = stepwise.allowed(output[:n], 256, torch.device("cpu"))
    replayed = RowGrammar(compiled, 256).allowed(output, 256, torch.device("cpu"))
    assert torch.equal(mask, replayed) and model.tokenizer.decode(torch.nonzero(mask).flatten().tolist()) == "e"


def test_a_migrated_request_goes_on_under_its_schema(model):
    """A request re-prefilled elsewhere with its output so far (migration) draws the same next
    token: the new worker's matcher replays that output before masking."""
    prompt, params = [40, 41, 42], SamplingParams(max_new_tokens=40, json_schema=SCHEMA)
    whole = Engine(model, EngineConfig(max_batch=2)).generate([prompt], params)[0].output_ids
    for k in (1, 5, len(whole) - 1):
        elsewhere = Engine(model, EngineConfig(max_batch=2)).prefiller
        assert elsewhere.prefill(prompt, params, generated=whole[:k]).token_id == whole[k]


@pytest.mark.parametrize("field, text, words", [
    ("json_schema", "not json", "not valid JSON"), ("json_schema", "[1, 2]", "must be a JSON object"),
    ("json_schema", '{"type": "nonsense"}', "nonsense"),
    ("json_schema", "{" + '"a": 1, ' * 20000 + '"b": 2}', "at most 65536"),
    ("regex", "[a-", "the regex cannot be used"), ("regex", "a" * 70000, "at most 65536"),
    ("grammar", "root ::= (", "the grammar cannot be used"), ("grammar", 'start ::= "a"', "root"),
])
def test_a_constraint_nobody_can_use_is_refused_naming_the_field(model, field, text, words):
    with pytest.raises(InvalidParam) as e:
        params = SamplingParams(**{field: text})
        params.validate()
        check(params, model.grammars)
    assert e.value.field == field and words in str(e.value) and ".cc:" not in str(e.value), str(e.value)


def test_two_constraints_at_once_are_refused():
    with pytest.raises(InvalidParam, match="regex cannot be combined with json_schema") as e:
        SamplingParams(json_schema=SCHEMA, regex=REGEX).validate()
    assert e.value.field == "regex"


def test_a_model_without_a_tokenizer_refuses_a_schema(tiny):
    with pytest.raises(InvalidParam, match="no tokenizer"):
        check(SamplingParams(json_schema=SCHEMA), tiny.grammars)


@pytest.mark.slow(20)
@pytest.mark.parametrize("colocated", [0, 1], ids=["disaggregated", "colocated"])
def test_every_constraint_field_through_the_http_api_in_both_topologies(model_dir, model, colocated):
    from router.http_gateway import start_gateway
    prompt = "pick one"
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    with loopback_cluster(model_dir, colocated=colocated) as c:
        gw = start_gateway(c["router"].address, "127.0.0.1", 0)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
            fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": json.loads(SCHEMA)}}
            name = client.models.list().data[0].id
            r = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0,
                                          extra_body={"response_format": fmt})
            text = r.choices[0].text
            assert _follows(text) and r.choices[0].finish_reason == "stop"
            encode = lambda t: model.tokenizer.encode(t, add_special_tokens=False)   # noqa: E731
            assert encode(text) + [EOS] == reference(model, ids, ("json_schema", SCHEMA), 40)
            vllm_style = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0,
                                                   extra_body={"guided_json": json.loads(SCHEMA)})
            assert vllm_style.choices[0].text == text
            choice = ("grammar", choice_grammar(CHOICES))
            for extra, constraint in (({"guided_regex": REGEX}, ("regex", REGEX)),
                                      ({"structured_outputs": {"regex": REGEX}}, ("regex", REGEX)),
                                      ({"guided_choice": CHOICES}, choice), ({"structured_outputs": {"choice": CHOICES}}, choice),
                                      ({"guided_grammar": 'root ::= "ok" | [0-9]+'}, ("grammar", 'root ::= "ok" | [0-9]+'))):
                out = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0,
                                                extra_body=extra).choices[0]
                assert out.finish_reason == "stop" and encode(out.text) + [EOS] == reference(model, ids, constraint, 40)
            for extra, param, words in (({"guided_regex": "[a-"}, "guided_regex", "regex cannot be used"),
                                        ({"guided_grammar": "root ::= ("}, "guided_grammar", "grammar cannot be used"),
                                        ({"guided_choice": []}, "guided_choice", "non-empty list"),
                                        ({"guided_regex": REGEX, "response_format": {"type": "json_object"}},
                                         "guided_regex", "send one of response_format, guided_regex"),
                                        ({"structured_outputs": {"regex": REGEX, "choice": CHOICES}},
                                         "structured_outputs", "exactly one")):
                with pytest.raises(openai.BadRequestError) as e:
                    client.completions.create(model=name, prompt=prompt, max_tokens=4, extra_body=extra)
                assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
            for bad, words in (({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
                               ({"type": "json_schema", "json_schema": "not an object"}, "schema"),
                               ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "nonsense"),
                               ({"type": "yaml"}, "json_object")):
                with pytest.raises(openai.BadRequestError) as e:
                    client.completions.create(model=name, prompt=prompt, max_tokens=4,
                                              extra_body={"response_format": bad})
                assert e.value.body["param"] == "response_format" and words in e.value.body["message"], e.value.body
        finally:
            gw.stop()
