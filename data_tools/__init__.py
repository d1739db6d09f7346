"""Dataset building: converters of the public layouts (MovieLens, RecBole atomic files, Tencent TTL),
synthetic generators and the WebDataset shard writer. ``conure_dist`` only reads what these write."""
