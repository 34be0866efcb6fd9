"""Ray Serve: the two-stage search service (ingress, text encoder, sharded retrievers,
autoscaled re-rankers, catalog). :func:`serve` starts it; ``cluster/serve.yaml`` names
``thinkfast_pipelines.serve.app:build_app`` for ``serve run`` / ``serve deploy``."""

from thinkfast_pipelines.serve.run import serve

__all__ = ["serve"]
