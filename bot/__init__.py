"""mergebot's bot: Hub discussions and webhooks in, merged repos with cards out.

    from bot import Bot, Settings, create_app
    app = create_app(Bot(Settings.from_env()))

Modules: settings (environment), hub (every Hub call), commands (text -> command), licenses
(licence rules), cards (model cards), jobs (store and scheduler), worker (one job),
evolve (the `evolve` job kind), credentials (signed-in users' tokens, memory only),
rights (what a requester may read and publish),
webhooks (payloads), service (routing), app (HTTP), cli (`mergebot bot serve`),
markdown (strangers' text escaped in comments and cards).
"""

from bot.app import create_app
from bot.errors import BotError
from bot.service import Bot
from bot.settings import Settings

__all__ = ["Bot", "BotError", "Settings", "create_app"]
