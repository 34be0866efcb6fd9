"""The Ray Serve two-stage search service (``thinkfast serve``).

- ``args``: ``ServeArgs``, the typed configuration shared by the CLI and ``cluster/serve.yaml``;
- ``http_api``: the ``POST /search`` contract and its validation (no Ray);
- ``catalog``: key -> caption / media table of the corpus (no Ray);
- ``deployments``: TextEncoder, Retriever (one per index shard), Reranker, Catalog;
- ``ingress``: the FastAPI ingress and the search page (``static/index.html``);
- ``app``: ``build_app(ServeArgs) -> Application``, the ``import_path`` of serve configs.

Nothing is imported here, so ``import pipelines.serve_app.http_api`` stays free of Ray.
"""
