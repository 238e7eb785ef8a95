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
# gunicorn >= 25 opens a control socket in $XDG_RUNTIME_DIR or ~/.gunicorn by default: one path shared by every
# instance of the user, unwritable for some container users, and nothing here uses gunicornc.
control_socket_disable = True


def post_fork(server, worker):
    # Before the worker's request threads: glibc's arenas capped, freed memory handed back (heap.py).
    from heap import manage_heap

    manage_heap(_server.malloc_arena_max, _server.malloc_trim_interval)


def post_worker_init(worker):
    # Each worker loads its own models in the background as soon as it starts.
    worker.wsgi.extensions["model_loader"].start()
