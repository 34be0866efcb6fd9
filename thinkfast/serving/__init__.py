"""The search service's logic without Ray: the corpus catalog (``catalog``), the merge of
per-shard top-k (``merge``), the stages each Serve deployment runs (``stages``) and the
typed errors they report (``errors``). ``thinkfast_pipelines.serve`` only wires these into
Ray Serve deployments and an HTTP ingress.

Import the submodules directly; this package imports nothing itself.
"""
