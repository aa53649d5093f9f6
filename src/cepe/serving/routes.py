"""`create_app(model, config)`: the OpenAI-compatible HTTP application around a `CepeForCausalLM`.

Routes (every one needs `Authorization: Bearer $CEPE_API_KEY` when a key is set):
    POST /v1/completions, POST /v1/chat/completions   OpenAI bodies + `context` (ids and/or text)
    POST /v1/contexts (JSON {"text"} or multipart `file`), GET /v1/contexts, GET|DELETE /v1/contexts/{id}
    GET /v1/models, GET /health, GET /metrics (Prometheus text)
Errors are OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from .middleware import Gate
from .protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    error_response,
    invalid_body,
    render_chat,
    validation_summary,
)
from .service import ServeConfig, Service
from .store import CorruptContext, InvalidContextId, StoreWriteError
from .uploads import Uploads

log = logging.getLogger("cepe.serving")

API_KEY_ENV = "CEPE_API_KEY"


def create_app(model, config: ServeConfig | None = None, tokenizer=None, encoder_tokenizer=None) -> FastAPI:
    """The ASGI app serving `model` (a `CepeForCausalLM`). The API key defaults to $CEPE_API_KEY."""
    config = config or ServeConfig()
    if config.api_key is None:
        config.api_key = os.environ.get(API_KEY_ENV) or None
    svc = Service(model, config, tokenizer, encoder_tokenizer)
    uploads = Uploads(svc)

    @asynccontextmanager
    async def lifespan(app):
        svc.scheduler.start()
        log.info("ready", extra={"fields": {"event": "ready", "model": config.model_name, "store": str(svc.store.root),
                                            "stored_documents": len(svc.store), "api_key": bool(config.api_key)}})
        yield
        svc.scheduler.stop()

    app = FastAPI(title="cepe serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _apierror_response(request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return error_response(e.status, e.message, e.kind, e.code, headers, e.param)

    @app.exception_handler(StoreWriteError)
    async def _store_write(request, e: StoreWriteError):
        return error_response(507, str(e), "server_error", "store_full" if e.full else "store_unwritable")

    @app.exception_handler(CorruptContext)
    async def _corrupt(request, e: CorruptContext):
        return error_response(404, str(e), code="context_corrupt")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, f"invalid JSON body: {validation_summary(errors)}", code="invalid_json")
        e = invalid_body(errors)
        return error_response(e.status, e.message, code=e.code)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return error_response(
            e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error"
        )

    @app.exception_handler(ValueError)
    async def _value(request, e: ValueError):
        return error_response(400, str(e))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("unhandled error", extra={"fields": {"event": "error"}})
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    @app.get("/health")
    async def health():
        if svc.scheduler.stopping:  # shutting down, or the model worker process is gone: route elsewhere
            return JSONResponse({"status": "unavailable", "model": config.model_name}, status_code=503)
        return {"status": "ok", "model": config.model_name, "queue_depth": svc.scheduler.depth}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": config.model_name, "object": "model", "created": int(svc.metrics.started), "owned_by": "cepe"}
            ],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "empty prompt list", param="prompt")
        svc.check(req, req.max_new_tokens(config.max_tokens), len(prompts) * req.n)
        return await svc.complete(request, req, prompts, req.max_new_tokens(config.max_tokens), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        max_tokens = req.max_completion_tokens or req.max_tokens or config.max_tokens
        svc.check(req, max_tokens, req.n)
        svc.check_prompt_chars(sum(len(m.text()) for m in req.messages))
        prompt = render_chat(req.messages, svc.tokenizer)
        return await svc.complete(request, req, [prompt], max_tokens, chat=True)

    @app.post("/v1/contexts")
    async def upload_context(request: Request):
        return await uploads.upload(request)

    @app.get("/v1/contexts")
    async def list_contexts():
        docs = svc.store.list()
        return {"object": "list", "data": [d.to_json() for d in docs], "total_bytes": svc.store.total_bytes,
                "budget_bytes": svc.store.budget_bytes}

    def _known(doc_id: str):
        try:
            return svc.store.info(doc_id)
        except InvalidContextId as e:
            raise ApiError(400, str(e), code="invalid_context_id") from e
        except KeyError as e:
            raise ApiError(404, f"no stored context {doc_id}", code="context_not_found") from e

    @app.get("/v1/contexts/{doc_id}")
    async def get_context(doc_id: str):
        return _known(doc_id).to_json()

    @app.delete("/v1/contexts/{doc_id}")
    async def delete_context(doc_id: str):
        _known(doc_id)
        if not await asyncio.to_thread(svc.store.delete, doc_id):  # removed meanwhile by another replica
            raise ApiError(404, f"no stored context {doc_id}", code="context_not_found")
        return {"id": doc_id, "object": "context.deleted", "deleted": True}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(svc.metrics.render(svc.gauges()), media_type="text/plain; version=0.0.4")

    app.add_middleware(Gate, api_key=config.api_key, max_body=config.max_body_bytes, metrics=svc.metrics)
    return app
