"""The cloud tier: the object store interface and its backends, archive tiers, clocks.

``store`` (the :class:`~vtl.cloud.store.ObjectStore` protocol, values, errors), ``local`` (the
embedded directory store), ``s3`` (boto3; imported only when an S3 store is used), ``tiers``
(pools and the retrieval model, pure) and ``clock``.
"""
