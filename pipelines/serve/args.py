"""The one typed description of a search service: what it serves and how it is sized.

``thinkfast serve`` flags, the ``args:`` block of ``cluster/serve.yaml`` (used by
``serve run`` / ``serve deploy`` / a KubeRay RayService) and the Python API all end in a
:class:`ServeArgs`, so the three cannot drift apart. Unknown keys are errors (a typo in
the YAML must not silently fall back to a default). Nothing here imports Ray or torch.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentSize(_Strict):
    """Fixed-size deployment (ingress, text encoder, retriever shards, catalog)."""

    num_replicas: int = Field(1, ge=1, description="replicas of this deployment")
    num_cpus: float = Field(0.25, gt=0, description="logical CPUs reserved per replica")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per replica (fractional shares one GPU); 0: a CPU replica"
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests in flight per replica; Serve's default of 5 starves batching (STACK_NOTES 5)"
    )
    max_queued_requests: int = Field(
        128,
        ge=-1,
        description="requests each caller (HTTP proxy or ingress) queues for this deployment beyond those in flight;"
        " more are refused at once with 503 + Retry-After (Serve's backpressure) instead of waiting. -1: unbounded",
    )


class RerankerSize(_Strict):
    """The slow re-ranker is the expensive stage, so it alone autoscales and batches."""

    min_replicas: int = Field(1, ge=1, description="replicas kept warm (tokens + slow model loaded)")
    max_replicas: int = Field(2, ge=1, description="upper bound the autoscaler may reach")
    target_ongoing_requests: float = Field(2.0, gt=0, description="per-replica load the autoscaler aims for")
    upscale_delay_s: float = Field(10.0, ge=0, description="sustained overload before adding a replica")
    downscale_delay_s: float = Field(60.0, ge=0, description="sustained idleness before removing one")
    look_back_period_s: float = Field(
        30.0, gt=0, description="window the load metric is averaged over; Ray wants it > its 10 s metric push"
    )
    max_batch_size: int = Field(8, ge=1, description="requests whose candidates share one forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a partial batch waits for company")
    num_cpus: float = Field(0.5, gt=0, description="logical CPUs reserved per replica")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per replica (fractional shares one GPU); 0: a CPU replica"
    )
    max_ongoing_requests: int = Field(32, ge=1, description="must be >= max_batch_size or batches never fill")
    max_queued_requests: int = Field(
        128, ge=-1, description="requests each ingress replica queues for the re-ranker; more are a 503. -1: unbounded"
    )
    torch_threads: int = Field(1, ge=1, description="intra-op threads per replica (replicas x threads <= cores)")
    score_batch_size: int = Field(
        256, ge=1, description="(query, candidate) pairs per slow forward pass; bounds replica memory"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "RerankerSize":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}):"
                " batches could never fill"
            )
        return self


class ServiceLimits(_Strict):
    """Deadlines, retries, health checks and the size of a query image: what bounds a
    request when a replica dies, hangs or is overloaded (issue 20), or when it uploads. The stages are idempotent, so a call that a dead
    replica will never answer is abandoned after its attempt timeout and sent again;
    Serve routes the retry to another replica where one exists."""

    request_timeout_s: float = Field(
        15.0, gt=0, description="the ingress answers every request within this (else 503 + Retry-After)"
    )
    stage_timeout_s: float = Field(
        5.0, gt=0, description="per attempt of an encoder, retriever or catalog call; then it is retried"
    )
    rerank_timeout_s: float = Field(10.0, gt=0, description="per attempt of a re-ranker call (the slow stage)")
    stage_retries: int = Field(
        2, ge=0, le=10, description="more attempts of a stage call after a dead or silent replica (within the deadline)"
    )
    retry_after_s: float = Field(2.0, ge=0, description="the Retry-After of a 503 (overload, or no replica in time)")
    health_check_period_s: float = Field(
        2.0, gt=0, description="how often Serve probes each replica; a dead one is replaced after about this long"
    )
    health_check_timeout_s: float = Field(
        5.0, gt=0, description="a replica that does not answer a probe within this is restarted"
    )
    max_image_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        le=100 * 1024 * 1024,
        description="largest image file a query by image may send (decoded bytes; a JSON body carries 4/3 of it"
        " as base64); larger is a 413 before any decoding",
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        le=64 * 1024 * 1024,  # thinkfast.data.image.DEFAULT_MAX_PIXELS: embed's own bound
        description="most pixels (width x height, read from the header before decoding) of a query image; more is"
        " a 422, so a decompression bomb never reaches memory",
    )
    graceful_shutdown_timeout_s: float = Field(
        15.0,
        ge=0,
        description="how long a stopping replica may drain before it is killed; in-flight requests end by"
        " request_timeout_s anyway, and a hung replica holds its resources this long (Serve's default: 20)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ServiceLimits":
        for name in ("stage_timeout_s", "rerank_timeout_s"):
            if getattr(self, name) > self.request_timeout_s:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) > request_timeout_s ({self.request_timeout_s}):"
                    " an attempt could never finish inside the request's deadline"
                )
        return self


class ServeArgs(_Strict):
    """Everything a search service needs, all by URI (local path or ``s3://``)."""

    fast: str = Field(description="fast model directory (FastModel.save_pretrained)")
    slow: str = Field(description="slow model directory (SlowModel.save_pretrained)")
    index: str = Field(description="sharded FAISS index directory (`thinkfast index --out`)")
    embeddings: str = Field(description="`thinkfast embed --out`: its tokens/ is the slow-token store")
    corpus: str = Field(description="corpus Parquet: captions for results and media for /media/{key}")
    beta: float | None = Field(
        None, ge=0, le=1e6,
        description="weight of s_fast in h + beta*s_fast; None: the slow model's rerank_config.json "
                    "(thinkfast eval --choose-beta) when chosen for these models, else 0",
    )
    nprobe: int | None = Field(None, ge=1, description="IVF probes per shard search; None = the index's default")
    s3_endpoint: str | None = Field(None, description="S3 endpoint override; else the AWS_* environment")
    api_token_file: str | None = Field(
        None, description="file holding the access token (a mounted secret): the path only, never the token (auth.py)"
    )
    ingress: DeploymentSize = Field(default_factory=lambda: DeploymentSize(max_ongoing_requests=128))
    encoder: DeploymentSize = Field(default_factory=DeploymentSize)
    retriever: DeploymentSize = Field(
        default_factory=DeploymentSize, description="sizing of each per-shard Retriever deployment"
    )
    catalog: DeploymentSize = Field(default_factory=DeploymentSize)
    reranker: RerankerSize = Field(default_factory=RerankerSize)
    limits: ServiceLimits = Field(
        default_factory=ServiceLimits, description="deadlines, retries, health checks (what bounds a request under faults)"
    )
