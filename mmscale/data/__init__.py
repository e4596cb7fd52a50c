"""Data: image-caption datasets and splits (images.py), shard preparation with img2dataset
(shard_builder.py), tar shards read by index (indexed_shards.py) or front to back
(tar_stream.py), global batches cut into rank slices with exact resume (batches.py), weighted
sources (mixture.py), labelled multimodal data for fine-tuning (labelled.py), CBMF's frozen-tower
feature cache (features.py) and mmscale-curate's pass (curate/).

Submodules are imported where they are used; this package imports nothing itself."""
