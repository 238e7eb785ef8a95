"""gunicorn settings, read from the environment by config.ServerSettings (see README)."""

from config import ServerSettings

_server = ServerSettings.from_env()

bind = f"{_server.host}:{_server.port}"
workers = _server.workers
threads = _server.threads
worker_class = "gthread"  # threads answer /health and /setup while a prediction runs
timeout = _server.timeout
loglevel = _server.log_level
preload_app = False  # never: CUDA can't be used in a forked child once initialised in the parent


def post_worker_init(worker):
    # Each worker loads its own models in the background as soon as it starts.
    worker.wsgi.extensions["model_loader"].start()
