"""Integrations of hub-backdoor with the places models are published from (docs/integrations.md).

- ``github-action/``: a composite GitHub Action (``action.yml``, steps in ``run.sh``);
- ``hub_webhook/``: a Hugging Face Hub webhook service (``python -m integrations.hub_webhook``);
- the pre-commit hooks are in ``.pre-commit-hooks.yaml`` at the repository root, their entry point
  and the ``hf-backdoor`` console script in :mod:`hub_backdoor.integrations`.

This folder is not installed with the package; run the webhook service from a checkout.
"""
