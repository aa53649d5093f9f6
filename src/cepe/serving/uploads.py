"""`POST /v1/contexts`: read a document, encode it once, store it.

Concurrent uploads of one text (same content id) are encoded once: the first becomes the leader,
the others wait for its result and answer `created: false`. Across server processes sharing the
store, `DocumentStore.put` tells which one wrote the file first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from .protocol import ApiError, ContextUpload, invalid_body
from .store import CorruptContext

log = logging.getLogger("cepe.serving")


async def read_document(request: Request, max_bytes: int) -> tuple[str, str | None]:
    """(text, name) from a JSON `{"text", "name"?}` body or a multipart `file` (+ `name`)."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4, max_part_size=max_bytes)
        upload, name = form.get("file"), form.get("name")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "multipart upload needs a 'file' field", param="file")
        try:
            text = (await upload.read()).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(
                400, f"{upload.filename}: not UTF-8 text ({e.reason} at byte {e.start})", param="file"
            ) from e
        name = name if isinstance(name, str) and name else upload.filename
    elif ctype == "application/json":
        try:
            body = ContextUpload.model_validate(await request.json())
        except json.JSONDecodeError as e:
            raise ApiError(400, f"invalid JSON body: {e}", code="invalid_json") from e
        except ValidationError as e:
            raise invalid_body(e.errors(), "body") from e
        text, name = body.text, body.name
    else:
        raise ApiError(415, f"unsupported Content-Type {ctype!r}: send JSON {{'text': ...}} or a multipart 'file'")
    if not text.strip():
        raise ApiError(400, "empty document", param="text")
    if name is not None:
        name = str(name)[:256]
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, "name: lone UTF-16 surrogate, not valid Unicode text", code="invalid_text") from e
    return text, name


class Uploads:
    """Stores documents for a `Service`, one encoding per text however many clients send it."""

    def __init__(self, service):
        self.svc = service
        self._leaders: dict[str, asyncio.Future] = {}  # content id -> the upload encoding it now

    async def upload(self, request: Request) -> JSONResponse:
        svc = self.svc
        text, name = await read_document(request, svc.config.max_body_bytes)
        svc.check_document_chars(len(text), "document", "document_too_large")
        doc_id = svc.store.content_id(text)
        while True:
            if await asyncio.to_thread(svc.store.__contains__, doc_id):  # same text, same encoder: encoded already
                if (hit := await self._hit(doc_id)) is not None:
                    return hit
            leader = self._leaders.get(doc_id)
            if leader is None:
                break
            try:
                await asyncio.shield(leader)
            except Exception:  # noqa: BLE001 - the leader failed (its client left, ...): try ourselves
                continue
        future = asyncio.get_running_loop().create_future()
        self._leaders[doc_id] = future
        try:
            response = await self._store(request, doc_id, text, name)
            future.set_result(None)
            return response
        except BaseException as e:
            future.set_exception(e if isinstance(e, Exception) else ApiError(499, "client closed request"))
            future.exception()  # retrieved: followers may be none
            raise
        finally:
            del self._leaders[doc_id]

    async def _hit(self, doc_id: str) -> JSONResponse | None:
        """The stored entry (200, `created: false`); None if it turns out gone or corrupt: store it anew."""
        svc = self.svc
        try:
            await asyncio.to_thread(svc.store.get, doc_id)  # counts as a use for LRU, and verifies it
            info = svc.store.info(doc_id)
        except (KeyError, CorruptContext):  # evicted, deleted (by another replica) or quarantined meanwhile
            return None
        svc.metrics.add("store_hits")
        return JSONResponse({**info.to_json(), "created": False}, status_code=200)

    async def _store(self, request: Request, doc_id: str, text: str, name: str | None) -> JSONResponse:
        svc = self.svc
        ids = await asyncio.to_thread(svc.text.document, text, svc.config.max_context_tokens)
        limit = svc.config.max_context_tokens
        if len(ids) > limit:
            raise ApiError(413, f"document has {len(ids)} tokens; limit {limit} (--max-context-tokens)",
                           code="document_too_large")
        budget = svc.store.budget_bytes
        if len(ids) * svc.bytes_per_token > budget:
            raise ApiError(413, f"document needs ~{len(ids) * svc.bytes_per_token / 2**20:.1f} MiB encoded; the store "
                           f"budget is {budget / 2**20:.1f} MiB (--store-budget-mb)", code="document_too_large")
        t0 = time.perf_counter()
        states = await svc.encode(request, [ids])
        info, evicted, created = await asyncio.to_thread(svc.store.put, doc_id, states, name)
        if not created:  # another server process stored it meanwhile
            return JSONResponse({**info.to_json(), "created": False}, status_code=200)
        log.info(
            "context stored",
            extra={
                "fields": {"event": "context_stored", "id": doc_id, "tokens": info.tokens, "bytes": info.bytes,
                           "ms": round(1000 * (time.perf_counter() - t0), 1)}
            },
        )
        return JSONResponse({**info.to_json(), "created": True, "evicted": evicted}, status_code=201)
