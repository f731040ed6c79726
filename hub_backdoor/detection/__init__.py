"""The audit: reference pass (:mod:`.embeddings`) -> latent QP per class (:mod:`.reconstruction`)
-> input-space and neuron-space evidence (:mod:`.verification`, :mod:`.neuron`) -> detection rules
(:mod:`.rules`) and their calibration (:mod:`.calibration`) -> verdict and report
(:mod:`.validation`, :mod:`.report`). :func:`hub_backdoor.audit` (:mod:`.audit`) runs them in order.

Imports the sources and adapters, never purification or the outputs.
"""
