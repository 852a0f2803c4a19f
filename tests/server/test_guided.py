"""Structured outputs over HTTP with the official ``openai`` client: chat
``response_format`` (json_schema, json_object), the vLLM extras
``guided_json``, ``guided_regex``, ``guided_choice`` for completions and chat,
and 400s for bad or conflicting guided fields."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "info": {"type": "object", "properties": {"rank": {"type": "integer", "minimum": 1, "maximum": 9}},
                 "required": ["rank"], "additionalProperties": False},
    },
    "required": ["city", "info"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}]
DATE = r"\d{4}-\d{2}-\d{2}"


def test_chat_response_format_json_schema(client):
    r = client.chat.completions.create(
        model="demo", messages=ASK, max_tokens=60, temperature=0.0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_chat_json_object_and_extras(client):
    r = client.chat.completions.create(model="demo", messages=ASK, max_tokens=80, temperature=0.0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # ran out of tokens: still a JSON object's start
        assert r.choices[0].message.content.lstrip().startswith("{")
    r = client.chat.completions.create(model="demo", messages=ASK, max_tokens=8, temperature=0.0,
                                       extra_body={"guided_choice": ["Paris", "London"]})
    assert r.choices[0].message.content in ("Paris", "London")


def test_completions_guided_extras(client):
    r = client.completions.create(model="demo", prompt="Today's date is", max_tokens=16, temperature=0.8, seed=3, n=2,
                                  extra_body={"guided_regex": DATE})
    for c in r.choices:
        assert re.fullmatch(DATE, c.text) and c.finish_reason == "stop"
    r = client.completions.create(model="demo", prompt="The capital of France, as JSON:", max_tokens=60,
                                  temperature=0.0, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


@pytest.mark.parametrize("body,param", [
    ({"guided_regex": "(unclosed"}, "guided_decoding"),
    ({"guided_json": "{not json"}, "guided_decoding"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": DATE, "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"guided_regex": DATE, "guided_decoding_backend": "outlines"}, "guided_regex"),
])
def test_bad_guided_fields_are_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=ASK, max_tokens=4, extra_body=body)
    assert e.value.body["param"] == param, e.value.body
    # the server keeps serving
    r = client.completions.create(model="demo", prompt="Hi", max_tokens=2)
    assert r.choices[0].text is not None
