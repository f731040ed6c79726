"""Integrations of hub-backdoor with the places models are published from (docs/integrations.md).

- ``github-action/``: a composite GitHub Action (``action.yml``, steps in ``run.sh``);
- ``hub_webhook/``: a Hugging Face Hub webhook service, installed as the package
  ``hub_backdoor_webhook`` with the console script ``hub-backdoor-webhook``;
- the pre-commit hooks are in ``.pre-commit-hooks.yaml`` at the repository root, their entry point
  and the ``hf-backdoor`` console script in :mod:`hub_backdoor.integrations`.

The Action runs from this repository (``uses: <owner>/hub-backdoor/integrations/github-action@<ref>``)
and installs the package itself.
"""
