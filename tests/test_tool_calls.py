"""Tool calling on the chat API (router/http_gateway/tools.py): tool definitions reach the model's
chat template, `<tool_call>{...}</tool_call>` in the answer comes back as `tool_calls` with
finish_reason "tool_calls", streamed or not; text that is not a call stays content; what is not
supported is a 400 naming the field."""
from __future__ import annotations

import json

import openai
import pytest

from loopback import loopback_cluster
from router.http_gateway.gateway import render_chat_template
from router.http_gateway.tools import CallFilter, definitions, parse, template_message
from tiny_model import save_char_tokenizer, save_tiny

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# A chat template that renders tools and earlier calls, in the tiny character vocabulary.
TEMPLATE = ("{% if tools %}{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}{% endif %}"
            "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
            "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
            "{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %} {% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CALL_REGEX = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>'


def test_calls_are_parsed_out_of_the_text_and_the_rest_is_the_content():
    content, calls = parse("Let me look. " + CALL_TEXT + CALL_TEXT.replace("Paris", "Oslo"))
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["get_weather"] * 2
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert parse(CALL_TEXT)[0] is None and parse("no call") == ("no call", [])
    assert parse("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])


def test_a_streamed_answer_holds_back_only_what_may_begin_a_call():
    f = CallFilter()
    shown = [f.feed(piece) for piece in ("Hi <", "tool", "_call>{\"name\": \"get_weather\"", ", \"arguments\": {}}",
                                          "</tool_call>")]
    assert "".join(shown) == "Hi " and shown[0] == "Hi "
    rest, calls = f.finish()
    assert rest == "" and calls[0]["function"] == {"name": "get_weather", "arguments": "{}"}
    g = CallFilter()
    assert g.feed("a <b") == "a <b" and g.feed(" <to") == " " and g.finish() == ("<to", [])


def test_tool_choice_and_tools_are_checked_and_messages_reach_the_template():
    assert definitions(TOOLS, None) == TOOLS == definitions(TOOLS, "auto")
    assert definitions(TOOLS, "none") is None and definitions(None, None) is None and definitions([], "none") is None
    for tools, choice, param in ((TOOLS, "required", "tool_choice"), ([{"type": "function"}], "auto", "tools"),
                                 (["get_weather"], "auto", "tools"), (None, "auto", "tool_choice")):
        with pytest.raises(Exception) as e:
            definitions(tools, choice)
        assert e.value.status == 400 and e.value.param == param
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    msgs = [template_message("user", "hi", None, None), template_message("assistant", "", [call], None),
            template_message("tool", "sunny", None, "c1")]
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}

    class Tok:   # what render_chat_template asks of a tokenizer: apply_chat_template
        def apply_chat_template(self, messages, tools, add_generation_prompt, tokenize):
            from jinja2 import Template
            text = Template(TEMPLATE).render(messages=messages, tools=tools, add_generation_prompt=True)
            self.text = text
            return [1]
    tok = Tok()
    render_chat_template(tok, msgs, TOOLS)
    assert tok.text == ('[tool get_weather]user: hi assistant: [call get_weather {"city": "Rome"}] '
                        'tool: sunny[for c1] assistant: ')


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    d = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    save_char_tokenizer(d)
    path = f"{d}/tokenizer_config.json"   # the template goes into the tokenizer's config
    cfg = json.loads(open(path).read())
    cfg["chat_template"] = TEMPLATE
    with open(path, "w") as f:
        json.dump(cfg, f)
    return d


def test_a_tool_call_comes_back_as_tool_calls_streamed_or_not(tool_model):
    from router.http_gateway import start_gateway
    with loopback_cluster(tool_model, colocated=1) as c:
        gw = start_gateway(c["router"].address, "127.0.0.1", 0)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
            name = client.models.list().data[0].id
            ask = dict(model=name, messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS,
                       max_tokens=80, temperature=0, extra_body={"guided_regex": CALL_REGEX})   # the model must call
            r = client.chat.completions.create(**ask)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            [call] = choice.message.tool_calls
            assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
            deltas = list(client.chat.completions.create(**ask, stream=True))
            assert "".join(d.choices[0].delta.content or "" for d in deltas if d.choices) == ""
            [streamed] = [tc for d in deltas if d.choices for tc in d.choices[0].delta.tool_calls or []]
            assert streamed.function.name == "get_weather" and streamed.index == 0
            assert [d.choices[0].finish_reason for d in deltas if d.choices and d.choices[0].finish_reason] == ["tool_calls"]
            free = client.chat.completions.create(**{**ask, "extra_body": {"guided_regex": "[a-z]{5}"}})
            assert free.choices[0].finish_reason != "tool_calls" and len(free.choices[0].message.content) == 5
            for extra, param in (({"tool_choice": "required"}, "tool_choice"), ({"tools": [{"type": "x"}]}, "tools")):
                with pytest.raises(openai.BadRequestError) as e:
                    client.chat.completions.create(**{**ask, **extra})
                assert e.value.body["param"] == param, e.value.body
        finally:
            gw.stop()
