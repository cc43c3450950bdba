"""The default model, float32: prompts served together give generate()'s tokens for each alone."""
import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.model_files import encode_prompt
from baton.model_loader import load_model
from baton.sampling import SamplingParams

pytestmark = pytest.mark.slow(15)

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain gravity to a child in two sentences.", "List three prime numbers."]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", "float32", "cpu")


def test_smollm2_batched_equals_generate(smollm2):
    prompts = [encode_prompt(smollm2.tokenizer, p) for p in PROMPTS]
    reqs = Engine(smollm2, EngineConfig(max_batch=4)).generate(
        prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
    for p, r in zip(prompts, reqs):
        ids = torch.tensor([p])
        ref = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                     do_sample=False, eos_token_id=None, pad_token_id=2)
        assert r.output_ids == ref[0, len(p):].tolist(), smollm2.tokenizer.decode(r.output_ids)
    assert "Paris" in smollm2.tokenizer.decode(reqs[0].output_ids)


def test_the_default_model_is_served_from_its_gguf_blocks_with_the_same_bits(smollm2):
    """On a CPU every linear of the Q4_1 model reads its GGUF blocks (a fifth of the float32 bytes),
    and gives what the float32 weights give, bit for bit."""
    from baton.engine.linear import Linear
    from baton.engine.runner import ModelRunner
    runner = ModelRunner(smollm2.model, smollm2.gguf)
    linears = [lin for L in runner.linears for lin in L] + [runner.lm_head]
    assert all(lin.quantized for lin in linears) and "121 of 121 as GGUF blocks" in runner.describe()
    x = torch.randn(9, 576)
    for lin in (runner.linears[0].qkv, runner.linears[29].gate_up, runner.lm_head):
        assert torch.equal(lin(x), Linear(lin.weight)(x))


def test_streamed_text_is_the_decoded_output(smollm2):
    from baton.engine.loop import EngineLoop
    from baton.request import Request
    loop = EngineLoop(Engine(smollm2, EngineConfig(max_batch=2))).start()
    try:
        req = Request("r", encode_prompt(smollm2.tokenizer, "Say hello in French and Japanese."),
                      SamplingParams(max_new_tokens=24))
        text = "".join(ev.text for ev in loop.submit(req))
    finally:
        loop.stop()
    assert text == smollm2.tokenizer.decode(req.output_ids, skip_special_tokens=True)


def test_a_json_schema_holds_the_real_model_to_it(smollm2):
    """SmolLM2's byte-level vocabulary through xgrammar: the object comes out complete and typed."""
    import json
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    prompt = encode_prompt(smollm2.tokenizer, "Describe Alice, 30, who lives in Paris, as JSON.")
    r = Engine(smollm2, EngineConfig(max_batch=2)).generate(
        [prompt], SamplingParams(max_new_tokens=60, json_schema=json.dumps(schema)))[0]
    value = json.loads(smollm2.tokenizer.decode(r.output_ids, skip_special_tokens=True))
    assert set(value) == {"name", "age", "city"} and isinstance(value["age"], int)
    assert r.output_ids[-1] in smollm2.eos_ids


def test_a_choice_and_a_regex_hold_the_real_model_to_them(smollm2):
    """The same vocabulary under a grammar of choices and a regular expression, in one batch."""
    import re

    from baton.sampling import choice_grammar
    choices = ["positive", "negative", "neutral"]
    prompts = [encode_prompt(smollm2.tokenizer, "Is 'I loved this film' positive, negative or neutral?"),
               encode_prompt(smollm2.tokenizer, "Give a date in the form YYYY-MM-DD.")]
    rs = Engine(smollm2, EngineConfig(max_batch=2)).generate(
        prompts, [SamplingParams(max_new_tokens=12, grammar=choice_grammar(choices)),
                  SamplingParams(max_new_tokens=16, regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}")])
    texts = [smollm2.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in rs]
    assert texts[0] in choices and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", texts[1]), texts
    assert all(r.output_ids[-1] in smollm2.eos_ids for r in rs)
