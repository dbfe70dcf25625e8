"""Data: the webdataset pipeline, shard writing and procedural toy data."""
