import sys

from conure_dist.cli import main

sys.exit(main())
