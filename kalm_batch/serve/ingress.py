"""HTTP ingress: the Cohere v2, Jina and TEI rerank APIs plus ``/score``, translated into scorer jobs.

Routes: ``POST /v2/rerank`` (Cohere), ``POST /v1/rerank`` (Jina), ``POST /rerank`` (TEI), ``POST /score`` (input
order), ``GET /health``, ``GET /info``, ``GET /stats`` (scorer batch sizes). Rerank routes sort by score, best first
(ties keep input order); ``/score`` keeps input order.

Errors are JSON ``{"error", "error_type", "request_id", "details"?}`` and never a 500 for a client's mistake:

* 422 — malformed JSON, missing fields, wrong types (FastAPI's ``RequestValidationError`` handler is overridden),
  both texts and ``document_ids`` or neither, an empty document list, a ratio the store cannot serve (lists the
  valid ratios), text that is not encodable (a lone surrogate such as ``"\ud800"``: ``invalid_text``, naming the
  field, e.g. ``documents[3]`` or ``pairs[0].query``);
* 413 — over a limit of ``ServeConfig`` (``kalm_batch.serve.limits``), checked before any tokenization: documents
  (``max_documents``), pairs (``max_pairs``), characters of the query, the instruction and each raw document
  (``max_query_chars``, ``max_instruction_chars``, ``max_document_chars``); then, by the scorer on a character-cut
  text, instruction tokens (``max_instruction_tokens``) and (TEI ``truncate=false``, TEI's default) a text longer
  than the model's ``max_length`` tokens or a query longer than its ``query_max_length``. The message names the field
  and the limit. Other routes truncate, as the model does (a long raw text is cut by characters first, so a 5 MB
  text costs what ``max_length`` tokens cost);
* 503 + ``Retry-After`` — retryable: the scorer replica died or is restarting, or more than ``max_queued_requests``
  wait for it (``error_type`` ``unavailable`` / ``overloaded``). While no scorer replica is running (the only one
  died and its replacement is starting) requests get this 503 at once instead of waiting in Serve's queue for the
  replacement (``kalm_batch.serve.availability``); ``GET /health`` is a 503 until a scorer replica has its store
  open and decoder loaded, and again while none is running;
* 404 — unknown document ids. Choice: the *whole request* fails and the error lists the unknown ids (up to 50), so a
  client never silently gets fewer results than it sent documents;
* 500 — only for the server's own faults: a corrupt store record (``error_type="corrupt_record"``) or an internal
  error. Both are logged with the request id. The Serve proxy assigns the request id (or keeps the client's
  ``X-Request-ID``) and echoes it in the ``X-Request-ID`` response header; error bodies carry it too.
"""

# No ``from __future__ import annotations`` here: Serve's class-based FastAPI ingress rebuilds the route functions,
# and string annotations would then no longer resolve (FastAPI would read the request body as query parameters).
import logging
import math
import uuid

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from kalm_batch.serve.availability import Readiness, ScorerGate, ScorerUnavailable
from kalm_batch.serve.limits import check_count, check_encodable, check_job
from kalm_batch.serve.schemas import (
    ApiError,
    CohereRerankRequest,
    CohereRerankResponse,
    DocRef,
    ErrorBody,
    ErrorInfo,
    JinaDocument,
    JinaRerankRequest,
    JinaRerankResponse,
    ScoreJob,
    ScoreOutcome,
    ScoreRequest,
    ScoreResponse,
    ServeConfig,
    TEIRerankRequest,
    TEIResult,
)

logger = logging.getLogger("ray.serve")
api = FastAPI(title="kalm-batch rerank", description="KaLM-Reranker-V1 over pre-encoded passage memories")


def _request_id(request: Request) -> str | None:
    return request.headers.get("x-request-id")


def _error_response(request: Request, info: ErrorInfo) -> JSONResponse:
    rid = _request_id(request)
    if info.status >= 500 and info.retry_after_s is None:  # retryable 503s are logged where they arise
        logger.error("request %s failed (%s): %s", rid, info.error_type, info.message)
    body = ErrorBody(error=info.message, error_type=info.error_type, request_id=rid, details=info.details)
    headers = {"Retry-After": str(info.retry_after_s)} if info.retry_after_s is not None else None
    return JSONResponse(status_code=info.status, content=body.model_dump(exclude_none=True), headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(request, exc.info)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
    if any(e.get("type") == "json_invalid" for e in errors):
        where = next(e["loc"][-1] for e in errors if e.get("type") == "json_invalid")
        return _error_response(request, ErrorInfo(422, "invalid_json", f"the request body is not valid JSON "
                                                  f"(error near character {where})", {"errors": errors}))
    text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5])
    return _error_response(request, ErrorInfo(422, "validation_error", f"invalid request: {text}",
                                              {"errors": errors}))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(request, ErrorInfo(exc.status_code, "http_error", str(exc.detail)))


@api.middleware("http")
async def _internal_errors(request: Request, call_next):
    try:
        return await call_next(request)
    except Exception as exc:  # the server's fault: log with the request id, answer 500 with it
        rid = _request_id(request) or uuid.uuid4().hex
        logger.exception("request %s failed with an internal error", rid)
        body = ErrorBody(error=f"internal error ({type(exc).__name__}); quote request id {rid}",
                         error_type="internal_error", request_id=rid)
        return JSONResponse(status_code=500, content=body.model_dump(exclude_none=True))


# ----------------------------------------------------------------------------------------------- request checks


def doc_refs(texts: list[str] | None, ids: list[str] | None, limits: ServeConfig, field: str) -> list[DocRef]:
    """Exactly one of texts (``field``) or ``document_ids``, non-empty and within ``max_documents``."""
    if texts is not None and ids is not None:
        raise ApiError(422, "validation_error", f"both `{field}` and `document_ids` were given; send exactly one")
    if texts is None and ids is None:
        raise ApiError(422, "validation_error", f"send `{field}` (texts) or `document_ids` (ids in the store)")
    kind, values, name = ("text", texts, field) if texts is not None else ("id", ids, "document_ids")
    check_count(len(values), name, limits.max_documents, "max_documents")
    return [DocRef(kind, v) for v in values]


def rerank_job(query: str, docs: list[DocRef], body, limits: ServeConfig, request: Request,
               doc_field: str = "documents", **kw) -> ScoreJob:
    job = ScoreJob([query] * len(docs), docs, instruction=body.instruction, ratio=body.ratio,
                   request_id=_request_id(request), **kw)
    check_job(job, limits, doc_field)
    return job


def score_job(body: ScoreRequest, limits: ServeConfig, request: Request) -> tuple[ScoreJob, list[str | None]]:
    """The ``/score`` job and the id echoed back for each pair."""
    if body.pairs is None:
        if body.query is None:
            raise ApiError(422, "validation_error", "send `pairs`, or `query` with `documents` or `document_ids`")
        docs = doc_refs(body.documents, body.document_ids, limits, "documents")
        job = rerank_job(body.query, docs, body, limits, request)
        return job, [d.value if d.kind == "id" else None for d in docs]
    if body.query is not None or body.documents is not None or body.document_ids is not None:
        raise ApiError(422, "validation_error", "send either `pairs` or `query` + `documents`/`document_ids`, "
                       "not both")
    check_count(len(body.pairs), "pairs", limits.max_pairs, "max_pairs", "too_many_pairs")
    docs = []
    for i, p in enumerate(body.pairs):
        if (p.document is None) == (p.document_id is None):
            raise ApiError(422, "validation_error", f"pairs[{i}] needs exactly one of `document` or `document_id`")
        if p.id is not None:
            check_encodable(p.id, f"pairs[{i}].id")
        docs.append(DocRef("text", p.document) if p.document is not None else DocRef("id", p.document_id))
    job = ScoreJob([p.query for p in body.pairs], docs, instruction=body.instruction, ratio=body.ratio,
                   request_id=_request_id(request))
    check_job(job, limits, pairwise=True)
    return job, [p.id if p.id is not None else p.document_id for p in body.pairs]


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if top_n is None else order[:top_n]


def total_tokens(out: ScoreOutcome) -> int:
    return sum(out.prompt_tokens) + sum(out.doc_tokens)


# ----------------------------------------------------------------------------------------------- the deployment


@serve.deployment(name="KaLMIngress", ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class KaLMIngress:
    """Validates requests, enforces the limits and turns scorer outcomes into each API's response."""

    def __init__(self, scorer, config: dict):
        self.limits = ServeConfig.model_validate(config)
        self.gate = ScorerGate(scorer, check_s=self.limits.replica_check_s, timeout_s=self.limits.health_timeout_s)

    def _unavailable(self, exc: ScorerUnavailable, what: str) -> ApiError:
        """A retryable failure (replica died, restarting, or the queue is full) as a 503 with Retry-After."""
        logger.warning("%s: %s", what, exc.reason)
        return ApiError(503, exc.kind, f"{exc.reason}; retry after {self.limits.retry_after_s} s",
                        retry_after_s=self.limits.retry_after_s)

    async def _ask(self, method: str, *args, what: str):
        try:
            return await self.gate.call(method, *args)
        except ScorerUnavailable as exc:
            raise self._unavailable(exc, what) from None

    async def _run(self, job: ScoreJob) -> ScoreOutcome:
        out: ScoreOutcome = await self._ask("score", job, what=f"request {job.request_id}")
        if out.error is not None:
            raise ApiError(out.error.status, out.error.error_type, out.error.message, out.error.details)
        return out

    @api.post("/v2/rerank", response_model=CohereRerankResponse)
    async def cohere_rerank(self, body: CohereRerankRequest, request: Request) -> CohereRerankResponse:
        docs = doc_refs(body.documents, body.document_ids, self.limits, "documents")
        out = await self._run(rerank_job(body.query, docs, body, self.limits, request,
                                         max_doc_tokens=body.max_tokens_per_doc))
        meta = {"api_version": {"version": "2"}, "billed_units": {"search_units": math.ceil(len(docs) / 100)},
                "tokens": {"input_tokens": total_tokens(out), "output_tokens": 0},
                "kalm": {"model": out.model_id, "ratio": out.ratio, "store_version": out.store_version}}
        if body.max_tokens_per_doc is not None and body.document_ids is not None:
            meta["warnings"] = [("max_tokens_per_doc does not apply to document_ids: their memories were "
                                 "encoded at the store's max_length")]
        results = [{"index": i, "relevance_score": out.p_yes[i]} for i in ranked(out.p_yes, body.top_n)]
        return CohereRerankResponse(id=_request_id(request) or uuid.uuid4().hex, results=results, meta=meta)

    @api.post("/v1/rerank", response_model=JinaRerankResponse, response_model_exclude_none=True)
    async def jina_rerank(self, body: JinaRerankRequest, request: Request) -> JinaRerankResponse:
        texts = None if body.documents is None else [
            d.text if isinstance(d, JinaDocument) else d for d in body.documents]
        docs = doc_refs(texts, body.document_ids, self.limits, "documents")
        out = await self._run(rerank_job(body.query, docs, body, self.limits, request))
        results = []
        for i in ranked(out.p_yes, body.top_n):
            doc = None
            if body.return_documents:
                doc = {"text": docs[i].value} if docs[i].kind == "text" else {"id": docs[i].value}
            results.append({"index": i, "relevance_score": out.p_yes[i], "document": doc})
        return JinaRerankResponse(model=out.model_id, usage={"total_tokens": total_tokens(out)}, results=results)

    @api.post("/rerank", response_model=list[TEIResult], response_model_exclude_none=True)
    async def tei_rerank(self, body: TEIRerankRequest, request: Request) -> list[TEIResult]:
        docs = doc_refs(body.texts, body.document_ids, self.limits, "texts")
        out = await self._run(rerank_job(body.query, docs, body, self.limits, request, doc_field="texts",
                                         reject_overlong=not body.truncate))
        values = out.margin if body.raw_scores else out.p_yes
        return [TEIResult(index=i, score=values[i], text=docs[i].value if body.return_text else None)
                for i in ranked(values, None)]

    @api.post("/score", response_model=ScoreResponse, response_model_exclude_none=True)
    async def score(self, body: ScoreRequest, request: Request) -> ScoreResponse:
        job, ids = score_job(body, self.limits, request)
        out = await self._run(job)
        results = [{"index": i, "id": ids[i], "score": out.p_yes[i],
                    "margin": out.margin[i] if body.return_margin else None} for i in range(len(ids))]
        return ScoreResponse(model=out.model_id, results=results, usage={"total_tokens": total_tokens(out)})

    @api.get("/health")
    async def health(self) -> dict:
        """200 while a scorer replica has its store open and decoder loaded; 503 (with Retry-After) otherwise."""
        state, why = await self.gate.probe()
        if state is not Readiness.READY:
            raise ApiError(503, "not_ready", f"not ready: {why}; retry after {self.limits.retry_after_s} s",
                           retry_after_s=self.limits.retry_after_s)
        return {"status": "ok"}

    @api.get("/info")
    async def info(self) -> dict:
        info = await self._ask("info", what="/info")
        return {**info, "limits": self.limits.limits(), "batch_stats": await self._ask("batch_stats", what="/info")}

    @api.get("/stats")
    async def stats(self) -> dict:
        return await self._ask("batch_stats", what="/stats")
