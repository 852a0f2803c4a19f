"""Structured-output fields of the OpenAI API, as vLLM names them.

``response_format`` (``{"type": "json_schema", "json_schema": {"name", "schema"}}``
or ``{"type": "json_object"}``; ``"text"`` means none) and the extras
``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``
become one :class:`~fnllm.state.GuidedDecodingParams`. More than one of them
is a 400 naming the fields; a schema, regex or grammar that does not compile
is a 400 from the engine's add-time check.
"""

from __future__ import annotations

from fnllm.state import GuidedDecodingParams

EXTRAS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _error(message: str, param: str):
    from fnllm.server.serving import APIError

    return APIError(400, message, param=param)


def _response_format(rf) -> tuple[str, dict] | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return "response_format", {"json_object": True}
    if rf.json_schema is None or rf.json_schema.json_schema is None:
        raise _error("response_format of type json_schema needs json_schema.schema", "response_format")
    return "response_format", {"json": rf.json_schema.json_schema}


def guided_params(req) -> GuidedDecodingParams | None:
    """The request's guided decoding, or None; ``APIError`` 400 on a bad combination."""
    given = [(name, {name.removeprefix("guided_"): getattr(req, name)}) for name in EXTRAS
             if getattr(req, name, None) is not None]
    rf = _response_format(getattr(req, "response_format", None))
    if rf is not None:
        given.append(rf)
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(n for n, _ in given)
        raise _error(f"give at most one of response_format, {', '.join(EXTRAS)}; got {names}", given[1][0])
    name, kwargs = given[0]
    backend = getattr(req, "guided_decoding_backend", None)
    try:
        return GuidedDecodingParams(**kwargs, backend=backend)
    except ValueError as e:
        raise _error(str(e).replace("guided_decoding ", f"{name}: ", 1), name) from None
