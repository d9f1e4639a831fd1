"""The data layer: shard format and writer, per-modality decoding, tokenization, packing, pipeline.

Flow: `writer` turns manifests into WebDataset shards (`format` defines them); `pipeline` reads
shards, decodes each member with `audio` / `image` / `video`, renders the conversation with
`text` (placeholders expanded to the exact number of encoder positions), and `packing` packs
samples into fixed-length sequences with document boundaries kept.
"""
