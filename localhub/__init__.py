"""localhub: a server that speaks the Hugging Face Hub's HTTP protocol, for tests and offline demos.

Point huggingface_hub at it (``HfApi(endpoint=server.endpoint, token=...)``); only the
endpoint differs from the real Hub. See `localhub.testing.run_localhub` to start one in-process.
"""

from localhub.config import HubConfig
from localhub.errors import LocalHubError
from localhub.hub import LocalHub
from localhub.server import LocalHubServer
from localhub.webhooks import Delivery, Webhook

__all__ = ["Delivery", "HubConfig", "LocalHub", "LocalHubError", "LocalHubServer", "Webhook"]
