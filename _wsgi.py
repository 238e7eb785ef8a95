"""WSGI entry point: `gunicorn _wsgi:app` (settings in gunicorn.conf.py) or `python _wsgi.py --port 9090`.

Importing this module builds the app but loads no model: each worker starts loading in the
background right after it starts (gunicorn.conf.py's post_worker_init, or the first request).
"""

from __future__ import annotations

import argparse
import logging
import os

from flask import Flask

from api import create_app
from config import ServerSettings, Settings
from images import ImageLoader
from loader import ModelLoader
from mlbase import ProjectStore
from model import GroundedSAM


def create_backend_app(env=None, loader: ModelLoader | None = None) -> Flask:
    """The service's app from environment variables; `loader` may be given to supply other models."""
    env = os.environ if env is None else env
    server = ServerSettings.from_env(env)
    logging.basicConfig(format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    logging.getLogger().setLevel(server.log_level.upper())  # also when logging was configured before
    settings = Settings.from_env(env)
    logging.getLogger(__name__).info("settings: %s", settings.redacted())
    store = ProjectStore(settings.data_dir)
    loader = loader or ModelLoader(settings)
    images = ImageLoader(settings)

    def factory(project, label_config) -> GroundedSAM:
        return GroundedSAM(project, label_config, store=store, loader=loader, images=images, settings=settings)

    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    app = create_app(factory, health=loader.state, basic_auth=auth)
    app.extensions["model_loader"] = loader
    app.before_request(loader.start)  # for servers without gunicorn.conf.py's hook
    return app


app = create_backend_app()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Grounded SAM ML backend (development server)")
    parser.add_argument("--host", default=ServerSettings.from_env().host)
    parser.add_argument("--port", type=int, default=ServerSettings.from_env().port)
    args = parser.parse_args()
    app.extensions["model_loader"].start()
    app.run(host=args.host, port=args.port, threaded=True)
