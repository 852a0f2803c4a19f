"""The OpenAI-compatible request bodies as pydantic models (so ``/openapi.json`` is true).

Ranges that the engine checks are stated here too, so a bad value is a 400
naming the field before anything reaches the engine. Fields that OpenAI
defines and fnllm does not implement are accepted only at their neutral
value (e.g. ``echo: false``); anything else is a 400 saying so. Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1
MAX_N = 128

TokenId = Annotated[int, Field(ge=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema", description="The JSON schema the output follows.")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(default=None, description="A served model name (default: the only one).")
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[TokenId] | None = Field(default=None, description="Token ids that end a sequence.")
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) -> bias, clamped to [-100, 100].")
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="vLLM's extra: > 1 discourages repeats.")
    allowed_token_ids: list[TokenId] | None = Field(default=None, description="vLLM's extra: sample only these.")
    bad_words: list[str] | None = Field(default=None, description="vLLM's extra: words never generated.")
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                        description="vLLM's extra: logprobs of the prompt tokens (not with stream).")
    truncate_prompt_tokens: int | None = Field(default=None, ge=1,
                                               description="vLLM's extra: keep the prompt's last k tokens.")
    priority: int = Field(default=0, description="Lower runs first under the priority policy (vLLM's extra).")
    user: str | None = None
    # structured outputs (vLLM's names; at most one of them, see fnllm.server.guided)
    response_format: ResponseFormat | None = None
    guided_json: Union[str, dict, None] = Field(default=None, description="A JSON schema the output follows.")
    guided_regex: str | None = Field(default=None, description="A regular expression the output matches.")
    guided_choice: list[str] | None = Field(default=None, description="The output is exactly one of these.")
    guided_grammar: str | None = Field(default=None, description="An EBNF grammar (xgrammar's) the output follows.")
    guided_decoding_backend: str | None = Field(default=None, description="Only 'xgrammar' (or null).")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of such lists."
    )
    max_tokens: int = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(default=False, description="Not supported: only false.")
    best_of: int | None = Field(default=None, ge=1, description="Only equal to n (or null).")
    suffix: str | None = Field(default=None, description="Not supported: only null.")


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Default: what max_model_len leaves.")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[dict] | None = Field(default=None, description="Not supported (only empty or null).")


class TokenizeCompletionRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: Union[str, int, None] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
