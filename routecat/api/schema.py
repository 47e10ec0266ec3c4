"""OpenAI request bodies as frozen attrs values, and the one strict converter that reads them.

Invariant: a body that leaves :func:`parse_request` is fully typed and within bounds;
anything else is an ``InvalidRequest`` that names the offending field. Unknown fields
are ignored (SDKs send extras such as ``user`` or ``parallel_tool_calls``). Primitive
types are strict: ``"5"`` is not an integer and ``true`` is not a number.
"""

from __future__ import annotations

import json
import typing
from typing import Any, Literal, TypeVar

import attrs
import cattrs
from cattrs.errors import IterableValidationNote

from owlrun.protocol import register_exact, strict_converter
from routecat.api.errors import FieldError
from routecat.errors import InvalidRequest

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

MAX_TOKENS_LIMIT = 1_000_000


def _range(low: float, high: float) -> Any:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: float | None) -> None:
        if value is not None and not low <= value <= high:
            raise FieldError(attr.name, f"must be between {low:g} and {high:g}")

    return check


def _positive(_inst: Any, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 1 <= value <= MAX_TOKENS_LIMIT:
        raise FieldError(attr.name, f"must be between 1 and {MAX_TOKENS_LIMIT}")


def _non_empty(_inst: Any, attr: attrs.Attribute[Any], value: str | list[Any]) -> None:
    if len(value) == 0:
        raise FieldError(attr.name, "must not be empty")


def _stop(_inst: Any, attr: attrs.Attribute[Any], value: str | list[str] | None) -> None:
    if isinstance(value, list) and len(value) > 4:
        raise FieldError(attr.name, "accepts at most 4 sequences")


@attrs.frozen
class StreamOptions:
    include_usage: bool = False


Content = str | list[dict[str, Any]] | None
Stop = str | list[str] | None
ToolChoice = str | dict[str, Any] | None
# Reasoning controls: OpenAI's ``reasoning_effort``; Ollama's ``think`` (on/off, or a
# level for models that take one, such as gpt-oss).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]
Think = bool | Literal["low", "medium", "high"] | None


@attrs.frozen
class Message:
    role: Role
    content: Content = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


@attrs.frozen
class ChatCompletionRequest:
    model: str = attrs.field(validator=_non_empty)
    messages: list[Message] = attrs.field(validator=_non_empty)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = attrs.field(default=None, validator=_range(0, 2))
    top_p: float | None = attrs.field(default=None, validator=_range(0, 1))
    max_tokens: int | None = attrs.field(default=None, validator=_positive)
    max_completion_tokens: int | None = attrs.field(default=None, validator=_positive)
    stop: Stop = attrs.field(default=None, validator=_stop)
    seed: int | None = None
    presence_penalty: float | None = attrs.field(default=None, validator=_range(-2, 2))
    frequency_penalty: float | None = attrs.field(default=None, validator=_range(-2, 2))
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice = None
    response_format: dict[str, Any] | None = None
    n: int | None = None
    reasoning_effort: ReasoningEffort | None = None
    think: Think = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


EmbeddingInput = str | list[str] | list[int] | list[list[int]]
MAX_EMBEDDING_INPUTS = 2048
MAX_TOKEN_ID = 2**31 - 1


def _embedding_input(value: Any, _t: Any) -> str | list[str] | list[list[int]]:
    """A string, an array of strings, an array of token ids, or an array of arrays of
    token ids; never empty, at most 2,048 inputs."""
    if isinstance(value, str):
        if not value:
            raise TypeError("must not be an empty string")
        return value
    if not isinstance(value, list) or not value:
        raise TypeError("expected a string or a non-empty array")

    def token_ids(ids: Any) -> list[int] | None:
        """Token ids (integers as JSON Schema means them), or None."""
        if not isinstance(ids, list) or not ids:
            return None
        out = []
        for t in ids:
            if isinstance(t, float) and t.is_integer():
                t = int(t)
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID:
                return None
            out.append(t)
        return out

    single = token_ids(value)
    if single is not None:  # one input, as token ids
        return [single]
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise TypeError(f"at most {MAX_EMBEDDING_INPUTS} inputs")
    if all(isinstance(x, str) and x for x in value):
        return value
    many = [token_ids(x) for x in value]
    found = [ids for ids in many if ids is not None]
    if len(found) == len(many):
        return found
    raise TypeError(
        "expected a non-empty string, an array of non-empty strings, an array of token ids"
        " or an array of arrays of token ids"
    )


@attrs.frozen
class EmbeddingRequest:
    """``POST /v1/embeddings``."""

    model: str = attrs.field(validator=_non_empty)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = attrs.field(default=None, validator=_range(1, 65536))


@attrs.frozen
class CompletionRequest:
    """The legacy completions body (editors' autocomplete)."""

    model: str = attrs.field(validator=_non_empty)
    prompt: str | list[str] = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = attrs.field(default=None, validator=_range(0, 2))
    top_p: float | None = attrs.field(default=None, validator=_range(0, 1))
    max_tokens: int | None = attrs.field(default=None, validator=_positive)
    stop: Stop = attrs.field(default=None, validator=_stop)
    seed: int | None = None
    presence_penalty: float | None = attrs.field(default=None, validator=_range(-2, 2))
    frequency_penalty: float | None = attrs.field(default=None, validator=_range(-2, 2))
    suffix: str | None = None
    echo: bool = False
    n: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


@attrs.frozen
class RegisterRequest:
    name: str


@attrs.frozen
class TopupRequest:
    amount_sats: int


# -- the converter ---------------------------------------------------------------------

converter = strict_converter()


def _json_int(value: Any, _t: Any) -> int:
    """An integer as JSON Schema means it: a number with no fractional part (``5.0``
    is 5), never a string or a boolean."""
    if isinstance(value, bool):
        raise TypeError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    raise TypeError("expected an integer")


converter.register_structure_hook(int, _json_int)


def _content(value: Any, _t: Any) -> str | list[dict[str, Any]] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for part in value:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise TypeError("content parts must be objects with a string 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise TypeError("a text content part needs a string 'text'")
        return value
    raise TypeError("expected a string, null or an array of content parts")


def _stop_hook(value: Any, _t: Any) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise TypeError("expected a string or an array of strings")


def _tool_choice(value: Any, _t: Any) -> str | dict[str, Any] | None:
    if value is None or isinstance(value, str | dict):
        return value
    raise TypeError("expected a string or an object")


def _role(value: Any, _t: Any) -> str:
    roles = typing.get_args(Role)
    if value not in roles:
        raise TypeError(f"must be one of {', '.join(roles)}")
    return str(value)


def _is_list(t: Any) -> bool:
    return typing.get_origin(t) is list and t != list[dict[str, Any]]


def _list_factory(t: Any) -> Any:
    (item,) = typing.get_args(t)
    inner = converter.get_structure_hook(item)

    def structure(value: Any, _t: Any) -> list[Any]:
        if not isinstance(value, list):
            raise TypeError("expected an array")
        out, errors = [], []
        for i, element in enumerate(value):
            try:
                out.append(inner(element, item))
            except Exception as exc:
                note = IterableValidationNote(f"Structuring {t} @ index {i}", i, item)
                exc.__notes__ = [*getattr(exc, "__notes__", []), note]
                errors.append(exc)
        if errors:
            raise cattrs.IterableValidationError("While structuring a list", errors, t)
        return out

    return structure


def _choice(allowed: tuple[Any, ...]) -> Any:
    def structure(value: Any, _t: Any) -> Any:
        # ``True in (1,)`` holds in Python: compare types too.
        if value is None or any(value == a and type(value) is type(a) for a in allowed):
            return value
        shown = ", ".join(json.dumps(a) for a in allowed)
        raise TypeError(f"must be one of {shown}")

    return structure


def _prompt(value: Any, _t: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise TypeError("expected a string or an array of strings")


for _type, _hook in (
    (Content, _content),
    (Stop, _stop_hook),
    (ToolChoice, _tool_choice),
    (str | list[str], _prompt),
    (Role, _role),
    (ReasoningEffort | None, _choice(typing.get_args(ReasoningEffort))),
    (Think, _choice((True, False, "low", "medium", "high"))),
    (EmbeddingInput, _embedding_input),
    (Literal["float", "base64"], _choice(("float", "base64"))),
):
    register_exact(converter, _type, _hook)
converter.register_structure_hook_factory(_is_list, _list_factory)

T = TypeVar("T")


def decode_json(body: bytes) -> Any:
    """Parse a request body, or raise a 400 saying why. A lone surrogate escape
    (``"\\ud800"``) is valid JSON but no Unicode text: refused here, before it reaches
    a database or an engine."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise InvalidRequest("request body is not valid UTF-8") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if b"\\ud" in body.lower():
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidRequest("request body holds a lone surrogate: not Unicode text") from None
    return data


def parse_request(cls: type[T], data: Any) -> T:
    """Structure ``data`` into ``cls`` or raise a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return converter.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        field = _field_error(exc)
        if field is not None:
            raise InvalidRequest(
                f"invalid value for '{field.field}': {field}", param=field.field
            ) from None
        messages = cattrs.transform_error(exc)
        first = messages[0] if messages else "invalid request body"
        param = first.rsplit(" @ $.", 1)[1] if " @ $." in first else None
        reason = first.rsplit(" @ ", 1)[0]
        if param is not None and reason.startswith("required field missing"):
            text = f"missing required field '{param}'"
        elif param is not None:
            text = f"invalid value for '{param}': {_reason(exc, reason)}"
        else:
            text = reason
        raise InvalidRequest(text, param=param) from None
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(str(exc)) from None


def _field_error(exc: BaseException) -> FieldError | None:
    if isinstance(exc, FieldError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _field_error(inner)
            if found is not None:
                return found
    return None


def _reason(exc: BaseException, fallback: str) -> str:
    """The innermost message we raised ourselves (our hooks and validators speak plainly)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            return _reason(inner, fallback)
    if isinstance(exc, TypeError | ValueError) and str(exc):
        return str(exc)
    return fallback
