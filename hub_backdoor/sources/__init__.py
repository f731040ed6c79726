"""Where a job's inputs come from: the Hub (:mod:`.hub`), dataset sources (:mod:`.datasets`) and the
reference data an audit or a purification reads (:mod:`.reference`).

The first stage of the pipeline: sources -> adapters -> detection -> purification -> outputs. It
imports no later stage.
"""
