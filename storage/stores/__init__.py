"""Object stores that hold bundles (a local directory or S3 through s3fs): addressing, listing,
presigned URLs (``objectstore``) and the retry policy of S3 operations (``retry``)."""
