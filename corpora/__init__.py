"""Data tools: ROCOv2 / ROCO / image-caption tables to WebDataset shards, and the offline demo's phantoms."""
