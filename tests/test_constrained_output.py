"""Constrained decoding (json_schema; the HTTP API's response_format and guided_json): the output
follows the schema, token for token what an independent reference gives (transformers' forward
pass, xgrammar's matcher, argmax), whatever the batch-mates, in process, in both topologies and
through the HTTP API; schemas nobody can use are refused naming the field."""
from __future__ import annotations

import json
import random

import openai
import pytest
import torch

from baton.config import EngineConfig
from baton.engine import Engine
from baton.grammar import Grammars, RowGrammar, check
from baton.model_loader import load_model
from baton.request import FinishReason
from baton.sampling import InvalidParam, SamplingParams
from loopback import loopback_cluster
from tiny_model import EOS, save_char_tokenizer, save_tiny

SCHEMA = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"},
                                                      "pick": {"enum": ["red", "green", "blue"]}},
                     "required": ["ok", "pick"], "additionalProperties": False})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    save_char_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, "float64", "cpu")


def reference(model, prompt: list[int], schema: str, max_new_tokens: int) -> list[int]:
    """Greedy under the schema, computed apart from the engine: a full forward pass per token."""
    import xgrammar as xgr
    vocab = model.model.config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(model.tokenizer, vocab_size=vocab, stop_token_ids=sorted(model.eos_ids))
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False))
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


def test_engine_output_follows_the_schema_and_equals_the_reference_whatever_the_batch_mates(model):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 98) for _ in range(rng.randint(2, 30))] for _ in range(7)]
    schemas = [SCHEMA, "", SCHEMA, '{"type": "object"}', "", SCHEMA, ""]
    # 3 rows for 7 queries: constrained and free rows join and leave around each other
    engine = Engine(model, EngineConfig(max_batch=3, max_queue=len(prompts)))
    done = engine.generate(prompts, [SamplingParams(max_new_tokens=40, json_schema=s) for s in schemas])
    for r, p, s in zip(done, prompts, schemas):
        if not s:
            continue
        assert r.output_ids == reference(model, p, s, 40), r.request_id
        text = model.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        if s == SCHEMA:   # bounded: it must end, and follow the schema
            assert r.finish_reason is FinishReason.STOP and _follows(text), text
        elif r.finish_reason is FinishReason.STOP:   # any object: a random model may still be writing one
            assert isinstance(json.loads(text), dict), text


def test_a_row_grammar_rebuilt_from_its_output_masks_as_the_one_that_followed_every_step(model):
    """What a migrated request's new worker does: the matcher replays the output so far."""
    grammars = Grammars(model.tokenizer, model.model.config.vocab_size, model.eos_ids)
    compiled = grammars.compile(SCHEMA)
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


@pytest.mark.parametrize("schema, words", [
    ("not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ('{"type": "nonsense"}', "nonsense"),
    ("{" + '"a": 1, ' * 20000 + '"b": 2}', "at most 65536"),
])
def test_a_schema_nobody_can_use_is_refused_naming_the_field(model, schema, words):
    with pytest.raises(InvalidParam) as e:
        params = SamplingParams(json_schema=schema)
        params.validate()
        check(params, model.grammars)
    assert e.value.field == "json_schema" and words in str(e.value) and ".cc:" not in str(e.value)


def test_a_model_without_a_tokenizer_refuses_a_schema(tiny):
    with pytest.raises(InvalidParam, match="no tokenizer"):
        check(SamplingParams(json_schema=SCHEMA), tiny.grammars)


@pytest.mark.slow(20)
@pytest.mark.parametrize("colocated", [0, 1], ids=["disaggregated", "colocated"])
def test_response_format_through_the_http_api_in_both_topologies(model_dir, model, colocated):
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
            assert model.tokenizer.encode(text, add_special_tokens=False) + [EOS] == reference(model, ids, SCHEMA, 40)
            vllm_style = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0,
                                                   extra_body={"guided_json": json.loads(SCHEMA)})
            assert vllm_style.choices[0].text == text
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
