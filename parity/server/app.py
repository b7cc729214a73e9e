"""The OpenAI-compatible HTTP front: `build_app` makes the FastAPI app over an engine.

Endpoints: `GET|HEAD /v1/models`, `GET|HEAD /v1/models/{id}`, `POST /v1/chat/completions` (`ServingChat`),
`POST /v1/completions` (`ServingCompletion`), both streaming with server-sent events and not,
`GET|HEAD /health`, `GET|HEAD /metrics` (Prometheus). Errors have OpenAI's shape (see errors.py). `/openapi.json`
publishes the request-body schemas (the pydantic models of protocol.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from parity.errors import ParityError
from parity.server import protocol as P
from parity.server.engine_client import EngineClient
from parity.server.errors import OpenAIError, bad_request
from parity.server.metrics import CONTENT_TYPE
from parity.server.middleware import AllowedHostsMiddleware, RequestReadTimeoutMiddleware
from parity.server.serving_base import OpenAIServing
from parity.server.serving_chat import ServingChat
from parity.server.serving_completion import ServingCompletion
from parity.server.settings import ServerSettings, default_max_request_bytes
from parity.server.state import OpenAIServer

__all__ = ["OpenAIServer", "ServerSettings", "build_app", "default_max_request_bytes"]

log = logging.getLogger("parity.server")


def build_app(
    engine: EngineClient,
    settings: ServerSettings | None = None,
    *,
    chat_format: Any = None,
    sampling_params_cls: Callable[..., Any] | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` with OpenAI's API.

    Args:
        engine: the EngineClient (start, shutdown, generate, abort, stats, tokenizer, config, max_model_len).
        settings: ServerSettings (served model names, API key, thinking default, drain timeout).
        chat_format: chat encoder/parser (default: DeepSeek-V4's, from parity.tokenizer).
        sampling_params_cls: SamplingParams class (default: parity.engine.SamplingParams).
    Returns:
        a FastAPI app (`app.state.server` is its OpenAIServer); its lifespan starts the engine and, at
        shutdown, drains it for up to `settings.drain_timeout_s` seconds.
    """
    settings = settings or ServerSettings()
    srv = OpenAIServer(engine, settings, chat_format=chat_format, sampling_params_cls=sampling_params_cls)
    serving_chat = ServingChat(srv)
    serving_completion = ServingCompletion(srv)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.loop = asyncio.get_running_loop()
        if settings.manage_engine:
            await engine.start()
        await asyncio.to_thread(lambda: srv.max_token_chars)  # ~0.1 s vocabulary scan, off the request path
        try:
            yield
        finally:
            if settings.manage_engine:
                await engine.shutdown(drain_timeout_s=settings.drain_timeout_s)

    app = FastAPI(
        title="parity",
        description="OpenAI-compatible DeepSeek-V4 server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = srv
    if settings.request_read_timeout_s:
        app.add_middleware(RequestReadTimeoutMiddleware, timeout_s=settings.request_read_timeout_s)
    if settings.allowed_hosts:
        app.add_middleware(AllowedHostsMiddleware, allowed_hosts=settings.allowed_hosts)

    def error_response(e: OpenAIError, endpoint: str | None = None) -> JSONResponse:
        if endpoint:
            srv.metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {
            404: f"Unknown route {request.method} {request.url.path}",
            405: f"Method {request.method} not allowed on {request.url.path}",
        }.get(e.status_code, str(e.detail))
        return JSONResponse(
            OpenAIError(e.status_code, msg).body(), status_code=e.status_code, headers=getattr(e, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return JSONResponse(OpenAIError(500, f"Internal server error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    async def health() -> Response:
        """200 {"status": "ok"} while the engine runs; 503 when its loop has stopped or it reports an error.
        HEAD gets the same status and headers without the body (load balancers probe with either)."""
        if getattr(engine, "errored", False):
            return JSONResponse({"status": "error"}, status_code=503)
        if settings.manage_engine and getattr(engine, "running", True) is False:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.head("/metrics", include_in_schema=False)
    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition; HEAD gets the same status and headers without the body."""
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": srv.created,
            "owned_by": "parity",
            "root": settings.model_root or name,
            "parent": None,
            "max_model_len": srv.max_model_len,
        }

    @app.head("/v1/models", include_in_schema=False)
    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        """The served models; HEAD gets the same status and headers without the body."""
        srv.check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card(n) for n in settings.served_model_names]})

    @app.head("/v1/models/{model_id:path}", include_in_schema=False)
    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        srv.check_auth(request)
        if model_id not in settings.served_model_names:
            raise OpenAIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(model_card(model_id))

    async def guarded(serving: OpenAIServing, request: Request) -> Response:
        """Auth, body parsing, error shaping and request accounting around one generation endpoint."""
        arrival = time.perf_counter()
        endpoint = serving.endpoint
        srv.metrics.in_flight.inc()
        streaming = False
        try:
            srv.check_auth(request)
            srv.check_accepting()
            srv.check_content_type(request)
            req = P.parse_body(await srv.read_body(request), serving.request_cls)
            resp = await serving.create(req, request, arrival)
            if isinstance(resp, StreamingResponse):
                streaming = True  # the stream body decrements in_flight and counts the status
            elif resp is not None:
                srv.metrics.requests.labels(endpoint, str(resp.status_code)).inc()
            return resp
        except OpenAIError as e:
            return error_response(e, endpoint)
        except ClientDisconnect:  # the client left while sending its body (a truncated or malformed one)
            srv.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        except ParityError as e:  # chat encoding errors and other named input errors
            return error_response(bad_request(str(e), param=getattr(e, "param", None)), endpoint)
        except Exception as e:  # a bug: answer 500 with the cause, keep serving, log the traceback
            log.exception("unhandled error in %s", endpoint)
            return error_response(OpenAIError(500, f"Internal server error: {type(e).__name__}: {e}"), endpoint)
        finally:
            if not streaming:
                srv.metrics.in_flight.dec()

    @app.post("/v1/chat/completions", openapi_extra=request_body_schema(P.ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await guarded(serving_chat, request)

    @app.post("/v1/completions", openapi_extra=request_body_schema(P.CompletionRequest))
    async def completions(request: Request) -> Response:
        return await guarded(serving_completion, request)

    publish_schemas(app, [P.ChatCompletionRequest, P.CompletionRequest])
    return app


SCHEMA_REF = "#/components/schemas/{model}"


def request_body_schema(model: type) -> dict[str, Any]:
    """`openapi_extra` of a route whose JSON body is `model` (the route parses the body itself, so that
    errors keep OpenAI's shape), referring to `components.schemas`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": SCHEMA_REF.format(model=model.__name__)}}},
        }
    }


def publish_schemas(app: FastAPI, models: list[type]) -> None:
    """Add the JSON schemas of `models` (and the models they use) to the app's OpenAPI `components`."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = base()
        comps = doc.setdefault("components", {}).setdefault("schemas", {})
        for m in models:
            schema = m.model_json_schema(ref_template=SCHEMA_REF)
            comps.update(schema.pop("$defs", {}))
            comps[m.__name__] = schema
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
