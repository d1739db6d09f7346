"""Dataset building: converters of the public layouts (MovieLens, RecBole atomic files, Tencent TTL),
synthetic generators, the WebDataset shard writer (``conure data SOURCE``; ``prepare`` builds a
run config's shards on first use) and ``describe``, which validates and describes existing shards
(``conure data describe ROOT``). ``conure_dist`` only reads what these write; of it, only the
command line imports this package."""
