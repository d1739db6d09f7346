"""``python -m data_tools.synthetic_ttl``: the code lives in ``conure_dist.data.sources.synthetic_ttl``."""

from conure_dist.data.sources.synthetic_ttl import main

if __name__ == "__main__":
    main()
