"""What a job is, before any GPU runs it: the job spec a researcher submits (``spec``, with the
capture options in ``capture`` and the KV methods' part in :mod:`storage.kvquant.spec`), the job's
public fields (``fields``), the bundle layout a spec gives on a model (``layout``), the spec checked
against the model's facts (``modelcheck``) and the size estimate admission limits see
(``estimate``). Above :mod:`storage.models`, :mod:`storage.kvquant` and :mod:`storage.bundle`;
below :mod:`storage.index`.
"""
