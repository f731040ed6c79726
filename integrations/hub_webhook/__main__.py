"""``python -m integrations.hub_webhook``: run the webhook service (see ``--help``)."""

from .service import main

if __name__ == "__main__":
    raise SystemExit(main())
