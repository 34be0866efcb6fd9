"""Running thinkfast on a Ray cluster: ``thinkfast submit`` (Ray Jobs API)."""
