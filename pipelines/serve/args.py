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
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests in flight per replica; Serve's default of 5 starves batching (STACK_NOTES 5)"
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
    max_ongoing_requests: int = Field(32, ge=1, description="must be >= max_batch_size or batches never fill")
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


class ServeArgs(_Strict):
    """Everything a search service needs, all by URI (local path or ``s3://``)."""

    fast: str = Field(description="fast model directory (FastModel.save_pretrained)")
    slow: str = Field(description="slow model directory (SlowModel.save_pretrained)")
    index: str = Field(description="sharded FAISS index directory (`thinkfast index --out`)")
    embeddings: str = Field(description="`thinkfast embed --out`: its tokens/ is the slow-token store")
    corpus: str = Field(description="corpus Parquet: captions for results and media for /media/{key}")
    beta: float = Field(0.0, description="weight of s_fast in h + beta*s_fast (thinkfast.rerank's and eval's default: 0)")
    nprobe: int | None = Field(None, ge=1, description="IVF probes per shard search; None = the index's default")
    s3_endpoint: str | None = Field(None, description="S3 endpoint override; else the AWS_* environment")
    ingress: DeploymentSize = Field(default_factory=lambda: DeploymentSize(max_ongoing_requests=128))
    encoder: DeploymentSize = Field(default_factory=DeploymentSize)
    retriever: DeploymentSize = Field(
        default_factory=DeploymentSize, description="sizing of each per-shard Retriever deployment"
    )
    catalog: DeploymentSize = Field(default_factory=DeploymentSize)
    reranker: RerankerSize = Field(default_factory=RerankerSize)
