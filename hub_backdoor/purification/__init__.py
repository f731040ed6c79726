"""Removing a backdoor: :func:`hub_backdoor.purify` (:mod:`.purify`) fine-tunes with the
reconstructed latent change of the flagged class, :mod:`.guard` keeps the original model beside the
purified one, and :mod:`.metrics` holds the ``evaluate`` modules that score it (ASR, RA, DER).

Imports the detection stage (a purification starts from an audit), never the outputs.
"""
