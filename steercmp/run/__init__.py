"""Running an experiment: stages, cells, proposals, resume keys, the run directory, shards."""
