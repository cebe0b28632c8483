"""The pipelines: loops over the stages, one per command (pretrain, adapt, cluster, demo, study)."""
