"""``python -m data_tools.synthetic_tasks``: the code lives in ``conure_dist.data.sources.synthetic_tasks``."""

from conure_dist.data.sources.synthetic_tasks import main

if __name__ == "__main__":
    main()
