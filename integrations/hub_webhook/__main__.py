"""``hub-backdoor-webhook`` (``python -m hub_backdoor_webhook``, or ``python -m integrations.hub_webhook``
from a checkout): run the webhook service (see ``--help``)."""

from .service import main

if __name__ == "__main__":
    raise SystemExit(main())
