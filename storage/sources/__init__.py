"""Where a bulk job's sequences come from (torch-free): the ``source`` part of a job spec
(``spec``) and the rows read from it, streamed, never held whole (``rows``; uploaded files in
``readers``, local Hugging Face datasets in ``hfdatasets``). Below :mod:`storage.jobs`; the API
samples a source at admission with it, the worker streams it. docs/bulk-jobs.md."""
