"""OpenAI-compatible request bodies and response objects, plus CEPE's `context` field.

Only what the server honours is declared; unknown fields are ignored (clients send `user`,
`metadata`, ...), except options that would silently change the answer's meaning, which are
refused (`UNSUPPORTED`).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

# fields whose non-default value the server cannot honour: refused with 400, never ignored
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None,), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "response_format": (None,), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}


class ContextRef(BaseModel):
    """An explicit context item: a stored document `id` or raw `text` (exactly one)."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    text: str | None = None


# A string item is a stored id when it starts with "ctx-", raw text otherwise.
ContextItem = Union[str, ContextRef]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    context: list[ContextItem] | None = Field(None, description="stored context ids ('ctx-...') and/or raw documents")
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def unsupported(self) -> list[str]:
        extra = self.model_extra or {}
        return sorted(k for k, ok in UNSUPPORTED.items() if k in extra and extra[k] not in ok)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


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


class ContextUpload(BaseModel):
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


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage_body(usages: list[dict], prompts_counted: int | None = None) -> dict:
    prompt = sum(u["prompt_tokens"] for u in usages[: prompts_counted or len(usages)])
    completion = sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "context_tokens": max((u["context_tokens"] for u in usages), default=0)}


def completion_body(rid: str, model: str, texts: list[str], reasons: list[str], usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": usage}


def chat_body(rid: str, model: str, texts: list[str], reasons: list[str], usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                        for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": usage}


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


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, headers=None,
           param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code, param), status_code=status, headers=headers)


def validation_summary(errors) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts)
