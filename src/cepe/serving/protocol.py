"""OpenAI-compatible request bodies and response objects, plus CEPE's `context` field.

Only what the server honours is declared; unknown fields are ignored (clients send `user`,
`metadata`, ...), except options that would silently change the answer's meaning, which are
refused (`UNSUPPORTED`).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

# fields whose non-default value the server cannot honour: refused with 400, never ignored. A value
# is accepted only if it equals an allowed one *of the same type* (`logprobs: 0` is not `False`).
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None,), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0)}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def _allowed(value, allowed: tuple) -> bool:
    return any(value is a or (type(value) is type(a) and value == a) for a in allowed)


def _surrogate_path(obj, path: str = "") -> str | None:
    """Where in a JSON value a lone UTF-16 surrogate (valid JSON escape, not valid text) sits."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if (found := _surrogate_path(k, path) or _surrogate_path(v, f"{path}.{k}" if path else str(k))) is not None:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if (found := _surrogate_path(v, f"{path}[{i}]")) is not None:
                return found
    return None


class _TextOnly(BaseModel):
    """Refuses bodies holding a lone surrogate (`"\\ud800"`): no tokenizer can encode it."""

    @model_validator(mode="before")
    @classmethod
    def _no_surrogates(cls, data):
        if (where := _surrogate_path(data)) is not None:
            raise PydanticCustomError("invalid_text", "{where}: lone UTF-16 surrogate, not valid Unicode text",
                                      {"where": where})
        return data


class ContextRef(BaseModel):
    """An explicit context item: a stored document `id` or raw `text` (exactly one)."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    text: str | None = None


# A string item is a stored id when it starts with "ctx-", raw text otherwise.
ContextItem = str | ContextRef


class _Request(_TextOnly):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    context: list[ContextItem] | None = Field(None, description="stored context ids ('ctx-...') and/or raw documents")
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def unsupported(self) -> list[str]:
        extra = self.model_extra or {}
        return sorted(k for k, ok in UNSUPPORTED.items() if k in extra and not _allowed(extra[k], ok))

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)  # None (or null): OpenAI's default for completions, 16

    def max_new_tokens(self, server_limit: int) -> int:
        return min(16, server_limit) if self.max_tokens is None else self.max_tokens


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """String content, or the text parts of a list content."""
        if isinstance(self.content, list):
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ValueError(f"only text content parts are supported, got type {p.get('type')!r}")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ContextUpload(_TextOnly):
    model_config = ConfigDict(extra="forbid")
    text: str
    name: str | None = Field(None, max_length=256)


def render_chat(messages: list[ChatMessage], tokenizer) -> str:
    """The decoder's chat template when it has one, else a plain `role: text` transcript."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(
    message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage_body(usages: list[dict], prompts_counted: int | None = None) -> dict:
    prompt = sum(u["prompt_tokens"] for u in usages[: prompts_counted or len(usages)])
    completion = sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "context_tokens": max((u["context_tokens"] for u in usages), default=0)}


def completion_body(rid: str, model: str, texts: list[str], reasons: list[str], usage: dict) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ],
        "usage": usage,
    }


def chat_body(rid: str, model: str, texts: list[str], reasons: list[str], usage: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ],
        "usage": usage,
    }


def completion_chunk(rid: str, model: str, text: str, reason: str | None, created: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None, created: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


# ---------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers=None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code, param), status_code=status, headers=headers)


def validation_summary(errors) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts)


def invalid_body(errors, what: str = "request") -> ApiError:
    """The ApiError for pydantic errors: 400 for text that is not Unicode, else 422."""
    if text := [e for e in errors if e.get("type") == "invalid_text"]:
        return ApiError(400, validation_summary(text), code="invalid_text")
    return ApiError(422, f"invalid {what}: {validation_summary(errors)}")
