"""The search service's logic without Ray: the corpus catalog (``catalog``), the merge of
per-shard top-k (``merge``), the stages each Serve deployment runs (``stages``), the
typed errors they report (``errors``) and the deadlines / retries that bound a request's
stage calls when a replica dies or hangs (``deadline``). ``thinkfast_pipelines.serve`` only wires these into
Ray Serve deployments and an HTTP ingress.

Import the submodules directly; this package imports nothing itself.
"""
