"""Pydantic models of the online rerank endpoint: server config, the wire formats it speaks, and the internal job.

Wire formats (requests are validated strictly: a wrong JSON type is a 422, unknown fields are ignored so that clients
of the common rerank APIs can send their usual extras):

* Cohere v2 ``POST /v2/rerank``: ``model``, ``query``, ``documents`` (strings), ``top_n``, ``max_tokens_per_doc``.
* Jina ``POST /v1/rerank``: ``model``, ``query``, ``documents`` (strings or ``{"text": ...}``), ``top_n``,
  ``return_documents``.
* TEI ``POST /rerank``: ``query``, ``texts``, ``raw_scores``, ``return_text``, ``truncate``.
* ``POST /score``: ``pairs`` of ``{id?, query, document | document_id}``, or ``query`` + ``documents`` /
  ``document_ids``; ``return_margin``.

The kalm extension, accepted by every route: ``document_ids`` (memories from the store) instead of texts,
``instruction`` and ``ratio`` (a multiple of the store's r0). ``ScoreJob`` / ``ScoreOutcome`` travel between the
ingress and the scorer deployments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ----------------------------------------------------------------------------------------------- server config

# The scorer's batching knobs, defined once: flags of ServeConfig and fields of BatchingConfig (its user_config).
MaxBatchSize = Annotated[int, Field(64, ge=1, description="most request chunks one scorer batch gathers "
                                                          "(user_config)")]
BatchWaitTimeout = Annotated[float, Field(0.01, ge=0, description="how long a batch waits to fill (user_config)")]
MaxPairsPerBatch = Annotated[int, Field(256, ge=1, description="most (query, memory) pairs per scorer batch; larger "
                                                               "requests are split into chunks (user_config)")]
MaxBatchTokens = Annotated[int, Field(2048, ge=1, description="most prompt tokens + memory vectors per scorer "
                                                              "batch: bounds how long a small request waits behind "
                                                              "a large one (CPU default; raise it on a GPU) "
                                                              "(user_config)")]
MaxEncodeTokens = Annotated[int, Field(1024, ge=1, description="most encoder tokens per raw-text encoder step; "
                                                               "other requests' batches run between steps "
                                                               "(user_config)")]


class ServeConfig(BaseModel):
    """Everything ``kalm-batch serve`` / ``app_builder`` needs to run the endpoint."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="model directory or hub id; must match the store's fingerprint")
    store: str = Field(description="memory store URL (file://, s3://, or a local path)")
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the Serve proxy")
    replicas: int = Field(1, ge=1, description="number of scorer replicas")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per scorer replica (fractional allowed)")
    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per scorer replica (fractional; never more than "
                                                   "the cluster has, or the replica never schedules)")
    ingress_num_cpus: float = Field(0.1, gt=0, description="CPUs reserved per ingress replica")
    ingress_max_ongoing_requests: int = Field(512, ge=1, description="concurrent requests one ingress replica "
                                                                    "accepts (Serve's default of 5 would starve "
                                                                    "the scorer's batches)")
    dtype: str | None = Field(None, description="scorer dtype: float32, bfloat16, float16 (default: bf16 on "
                                                "CUDA, float32 on CPU)")
    device: str | None = Field(None, description="torch device for the scorer (default: cuda if present, else cpu)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads in each scorer replica "
                                                              "(default: what Ray sets from num_cpus)")
    max_documents: int = Field(1000, ge=1, description="most documents (texts or ids) one request may carry (413)")
    max_pairs: int = Field(1000, ge=1, description="most pairs one /score request may carry (413)")
    max_query_chars: int = Field(20000, ge=1, description="longest query, in characters (413); its tokens are cut "
                                                          "to the model's query_max_length (TEI truncate=false: 413)")
    max_instruction_chars: int = Field(4000, ge=1, description="longest instruction, in characters (413)")
    max_instruction_tokens: int = Field(512, ge=1, description="longest instruction, in tokens (413): the prompt's "
                                                               "cost grows with the square of its length")
    max_document_chars: int = Field(8_000_000, ge=1, description="longest raw document, in characters (413); a long "
                                                                 "text is cut by characters before tokenizing, so "
                                                                 "it costs what max_length tokens cost")
    max_batch_size: MaxBatchSize
    batch_wait_timeout_s: BatchWaitTimeout
    max_pairs_per_batch: MaxPairsPerBatch
    max_batch_tokens: MaxBatchTokens
    max_encode_tokens: MaxEncodeTokens
    max_tokens_per_batch: int = Field(32768, ge=1, description="padded tokens per decoder forward inside a batch")
    scorer_max_ongoing_requests: int | None = Field(None, ge=1, description="requests one scorer replica holds at "
                                                                            "once (default: max(2 x max_batch_size,"
                                                                            " 16))")
    max_queued_requests: int = Field(256, ge=1, description="requests waiting for a busy scorer beyond which the "
                                                            "endpoint answers 503 with Retry-After")
    retry_after_s: int = Field(5, ge=1, description="the Retry-After (seconds) of a 503 (replica died, restarting "
                                                    "or overloaded)")
    health_timeout_s: float = Field(2.0, gt=0, description="/health answers 503 when no ready scorer replica "
                                                           "answers within this time (also bounds the ingress's "
                                                           "replica probe)")
    replica_check_s: float = Field(2.0, gt=0, description="a request still waiting for the scorer after this long "
                                                          "checks that a scorer replica is running; if none is (it "
                                                          "died or is restarting) it is answered 503 + Retry-After "
                                                          "at once instead of waiting for the replacement")
    cache_bytes: int = Field(256 * 2**20, ge=0, description="store reader LRU cache (decoded memories), bytes")
    text_cache_bytes: int = Field(64 * 2**20, ge=0, description="raw-text memory LRU cache (by sha256), bytes")
    max_constructor_retries: int = Field(1, ge=1, description="failed scorer starts Serve allows before the "
                                                             "deployment fails (Ray's max_constructor_retry_count); "
                                                             "1 = Serve does not retry: a replica retries what a "
                                                             "retry may fix itself (startup_attempts) and fails at "
                                                             "once on what no retry fixes (a missing, incomplete or "
                                                             "mismatched store)")
    startup_attempts: int = Field(3, ge=1, description="attempts of a scorer replica to open the store and load the "
                                                       "model when a retry may help (an object-store or I/O error), "
                                                       "with backoff, before it fails")
    allow_mismatch: bool = Field(False, description="serve even if the store was made with another model")
    store_version: int | None = Field(None, ge=0, description="serve this store version (default: follow the latest)")
    store_poll_s: float = Field(10.0, gt=0, description="how often a replica checks the store for a newer version")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options for the store URL")
    app_name: str = Field("kalm", description="Serve application name")
    route_prefix: str = Field("/", description="Serve route prefix of the application")

    def batching(self) -> dict:
        """The scorer's ``user_config`` (tunable without restarting replicas)."""
        return {k: getattr(self, k) for k in BatchingConfig.model_fields}

    def limits(self) -> dict:
        """The request limits, as ``/info`` reports them."""
        return {k: getattr(self, k) for k in ("max_documents", "max_pairs", "max_query_chars",
                                              "max_instruction_chars", "max_instruction_tokens",
                                              "max_document_chars")}


class BatchingConfig(BaseModel):
    """The scorer's ``user_config``; validated in ``reconfigure``."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: MaxBatchSize
    batch_wait_timeout_s: BatchWaitTimeout
    max_pairs_per_batch: MaxPairsPerBatch
    max_batch_tokens: MaxBatchTokens
    max_encode_tokens: MaxEncodeTokens


# ----------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", protected_namespaces=())

    document_ids: list[str] | None = Field(None, description="kalm: store doc ids, instead of document texts")
    instruction: str | None = Field(None, description="kalm: task instruction (default: the model's)")
    ratio: int | None = Field(None, description="kalm: pooling ratio, a multiple of the store's r0")


class CohereRerankRequest(_Request):
    model: str | None = Field(None, description="accepted for compatibility; the served model is used")
    query: str
    documents: list[str] | None = None
    top_n: int | None = Field(None, ge=1)
    max_tokens_per_doc: int | None = Field(None, ge=1, description="truncates raw texts (encoder tokens)")


class JinaDocument(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    text: str


class JinaRerankRequest(_Request):
    model: str | None = Field(None, description="accepted for compatibility; the served model is used")
    query: str
    documents: list[str | JinaDocument] | None = None
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True


class TEIRerankRequest(_Request):
    query: str
    texts: list[str] | None = None
    raw_scores: bool = Field(False, description="return the yes-no logit margin instead of P(yes)")
    return_text: bool = False
    truncate: bool = Field(False, description="false: a text longer than the model's max_length is a 413")


class ScorePair(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = Field(None, description="echoed back in the result")
    query: str
    document: str | None = None
    document_id: str | None = None


class ScoreRequest(_Request):
    model: str | None = None
    pairs: list[ScorePair] | None = None
    query: str | None = None
    documents: list[str] | None = None
    return_margin: bool = False


# ----------------------------------------------------------------------------------------------- responses


class CohereResult(BaseModel):
    index: int
    relevance_score: float


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: dict[str, Any]


class JinaResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, str] | None = None


class JinaRerankResponse(BaseModel):
    model: str
    usage: dict[str, int]
    results: list[JinaResult]


class TEIResult(BaseModel):
    index: int
    score: float
    text: str | None = None


class ScoreResult(BaseModel):
    index: int
    id: str | None = None
    score: float
    margin: float | None = None


class ScoreResponse(BaseModel):
    model: str
    results: list[ScoreResult]
    usage: dict[str, int]


class ErrorBody(BaseModel):
    error: str
    error_type: str
    request_id: str | None = None
    details: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------- internal job


@dataclass(frozen=True)
class DocRef:
    """One document of a job: a store doc id (``kind="id"``) or a raw text (``kind="text"``)."""

    kind: Literal["id", "text"]
    value: str


@dataclass
class ScoreJob:
    """Pairs ``(queries[i], docs[i])`` to score; built by the ingress, run by the scorer."""

    queries: list[str]
    docs: list[DocRef]
    instruction: str | None = None
    ratio: int | None = None
    max_doc_tokens: int | None = None      # truncate raw texts to this many encoder tokens (prefix included)
    reject_overlong: bool = False          # TEI truncate=false: a raw text longer than max_length is a 413
    request_id: str | None = None


@dataclass
class ErrorInfo:
    status: int
    error_type: str
    message: str
    details: dict[str, Any] | None = None
    retry_after_s: int | None = None       # a retryable failure (503): sent as the Retry-After header


@dataclass
class ScoreOutcome:
    """Scores in pair order, or the client/store error that stopped the job."""

    p_yes: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    doc_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    ratio: int | None = None
    model_id: str = ""
    store_version: int | None = None  # the store version the stored memories came from
    error: ErrorInfo | None = None


class ApiError(Exception):
    """A request the server refuses: rendered as ``ErrorBody`` with ``status``."""

    def __init__(self, status: int, error_type: str, message: str, details: dict[str, Any] | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.info = ErrorInfo(status, error_type, message, details, retry_after_s)
