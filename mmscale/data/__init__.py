"""Data: image-caption datasets and splits (images.py), WebDataset shards, built with img2dataset
and read by index (shards.py), the rank-sharded resumable batch streams (stream.py), labelled
multimodal data for fine-tuning (labelled.py) and CBMF's frozen-tower feature cache (features.py).

Submodules are imported where they are used; this package imports nothing itself."""
