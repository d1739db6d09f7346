"""Training methods as strategies: one record per method (``registry``), the changes some of them
make to the model, applied from outside it (``patches``: PeterRec; ``joint``: MTL's joint loss),
and ``run.run_method``, which hands a run to the loop its record names.

Importing the package is cheap (the records only): the config validates ``method.name`` with it.
"""

from conure_dist.methods.registry import DEFAULT_METHOD, METHOD_NAMES, METHODS, Method

__all__ = ["DEFAULT_METHOD", "METHODS", "METHOD_NAMES", "Method"]
