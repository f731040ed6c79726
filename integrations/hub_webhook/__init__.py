"""A Hugging Face Hub webhook service that audits every new revision of watched model repos.

Run it with ``hub-backdoor-webhook`` (installed with ``pip install 'hub-backdoor[webhook]'``, which
brings FastAPI and uvicorn; ``python -m integrations.hub_webhook`` from a checkout); ``--help`` lists
the options (docs/integrations.md, "Hub webhook service"). The Hub posts an
event for each push; the service checks the ``X-Webhook-Secret`` header, parses the body with
huggingface_hub's ``WebhookPayload``, keeps content updates of watched branches of watched model
repos, and queues ``(repo, commit)`` jobs in SQLite. A background worker audits each commit once (one
job at a time per repo) with ``hub_backdoor.audit`` and answers on the Hub: a comment with the
verdict and the per-class table in a discussion of the repo, and, when a backdoor is found and
``--open-pr`` is on, a pull request with the purified model and its security card
(``hub_backdoor.purify`` and ``hub_backdoor.outputs.publish``). Queued and interrupted jobs survive a restart.
"""

from .service import Config, Service, parse_event
from .store import Job, JobStore

__all__ = ["Config", "Job", "JobStore", "Service", "parse_event"]
