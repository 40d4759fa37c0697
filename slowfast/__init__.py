"""SlowFast video networks, video decoding and shard formats: pure PyTorch, PyAV and pyarrow.

Nothing in this package imports Ray, MLflow or S3 clients; the distributed pipeline is in `pipelines`.
"""

__version__ = "0.1.0"
