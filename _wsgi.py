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
from evaluate import Evaluations
from images import ImageLoader
from jobs import JobParams, JobRunner, JobService, in_batches
from loader import ModelLoader
from logs import configure_logging
from ls_client import Connection, LabelStudioProject
from metrics import ServiceMetrics
from model import GroundedSAM
from page import TryService, index_response, register_page
from pipeline import Pipeline
from scheduler import Scheduler
from store import JobStore


def create_backend_app(env=None, loader: ModelLoader | None = None) -> Flask:
    """The service's app from environment variables; `loader` may be given to supply other models."""
    env = os.environ if env is None else env
    server = ServerSettings.from_env(env)
    configure_logging(server.log_level)  # format, level, and the third-party warnings we silence
    settings = Settings.from_env(env)
    logging.getLogger(__name__).info("settings: %s", settings.redacted())
    store = JobStore(settings.data_dir)
    loader = loader or ModelLoader(settings)
    images = ImageLoader(settings)
    scheduler = Scheduler(settings.model_concurrency, settings.queue_limit)  # owns this worker's model passes

    def background_pipeline() -> Pipeline:
        """The loaded models (waited for: a job may be queued while they load), each pass after every labeler's
        (the scheduler's least urgent kind): bulk jobs' and evaluations'."""
        return Pipeline(loader.get(timeout=24 * 3600), settings, images, loader.model_version, scheduler.background())

    def executor_for(params: JobParams, connection: Connection):
        """How this worker predicts a bulk job's tasks: BATCH_SIZE tasks at a time, in the background."""
        config, query = params.query()
        pipelines: list[Pipeline] = []

        def predict(tasks: list[dict]):
            if not pipelines:
                pipelines.append(background_pipeline())
            return pipelines[0].start_tasks(tasks, config, query, connection.url, connection.key)

        # One batch's host work (clean-up, regions) on a thread while the next batch's model passes run.
        return in_batches(predict, settings.batch_size, overlap=1)

    runner = JobRunner(store, executor_for,
                       lambda params, connection: LabelStudioProject(images.label_studio.sdk(connection),
                                                                     params.project))
    jobs = JobService(runner, settings, images.label_studio, loader.model_version)

    def factory(project, label_config) -> GroundedSAM:
        return GroundedSAM(project, label_config, store=store, loader=loader, images=images, settings=settings,
                           jobs=runner, scheduler=scheduler)

    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    def cache_stats() -> dict | None:
        return loader.get(timeout=0).cache.stats() if loader.state().get("models") == "ready" else None

    metrics = ServiceMetrics(scheduler, cache_stats, jobs.metrics)
    evaluations = Evaluations(settings, jobs, background_pipeline)
    app = create_app(factory, health=loader.state, basic_auth=auth, jobs=jobs, page=index_response, metrics=metrics,
                     evaluations=evaluations)
    app.extensions["model_loader"] = loader
    register_page(app, TryService(loader, settings, images, scheduler), status=loader.state)  # the page's routes
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
