"""Conure (continual user representations) as a distributed training system."""

import fsspec

# s3:// URLs open conure_dist.object_store.StoreFileSystem (imported on first use): bounded
# waits, one-line errors naming the endpoint and URL, no bucket created implicitly.
fsspec.register_implementation("s3", "conure_dist.object_store.StoreFileSystem", clobber=True)
