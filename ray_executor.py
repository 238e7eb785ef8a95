"""The bulk job on a Ray cluster: the same jobs.BulkJob, with its tasks predicted by Ray actors.

The driver (cli.py annotate --ray) pages through Label Studio's tasks, keeps the job state and imports the
predictions, exactly as in-process; `RayExecutor` only moves the predicting out. Each actor builds the models once
(`loader.build_models(settings)`, the service's settings object) and predicts batches of `batch_size` tasks: it
fetches their images and runs the pipeline. One actor per GPU on GPU nodes (`num_gpus=1`); on CPU nodes
`actors` actors of `threads` torch threads each. At most `in_flight` batches wait per actor, so the driver holds
only those, whatever the project's size. An actor that dies is restarted by Ray and its batches retried
(max_restarts / max_task_retries), so no task is lost, and an outcome reaches the driver once, so none is imported
twice.

Ray pattern note: this is Ray Core's actor pool with a bounded window rather than Ray Data's `map_batches`, because
the driver must see every task before (resume, skip) and after (the chunked import, the job state) it is predicted;
a Data pipeline would move those into its operators.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from config import Settings
from jobs import JobParams, batched
from ls_client import Connection
from pipeline import TaskOutcome

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class RayOptions:
    """address: 'local' (start a cluster in this process), 'auto' (the running cluster), or a cluster address.
    actors: how many (default: one per GPU of the cluster, else 2); threads: torch threads of a CPU actor;
    batch_size: tasks per call; in_flight: batches queued per actor."""

    address: str = "local"
    actors: int | None = None
    threads: int = 1
    batch_size: int = 4
    in_flight: int = 2


class _Predictor:
    """A Ray actor: the models, once, and the job's query."""

    def __init__(self, settings: Settings, params: JobParams, connection: Connection, threads: int):
        import contextlib
        import sys

        import torch

        from images import ImageLoader
        from loader import build_models
        from pipeline import Pipeline

        if settings.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(threads)
        with contextlib.redirect_stdout(sys.stderr):  # groundingdino prints while it builds its model
            self.pipeline = Pipeline(build_models(settings), settings, ImageLoader(settings))
        self.config, self.query = params.query()
        self.connection = connection

    def predict(self, tasks: list[dict]) -> list[TaskOutcome]:
        return self.pipeline.predict_tasks(tasks, self.config, self.query, self.connection.url, self.connection.key)

    def pid(self) -> int:
        return os.getpid()


class RayExecutor:
    """A jobs.Executor on Ray actors. Use as a context manager: the actors (and a local cluster) end with it."""

    def __init__(self, settings: Settings, params: JobParams, connection: Connection, options: RayOptions):
        import ray

        self.options = options
        # Workers import the project's modules from where the driver has them (in the Docker image: /app).
        runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT)}}
        self._started_cluster = not ray.is_initialized()
        if self._started_cluster:
            if options.address == "local":
                ray.init(runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=options.address, runtime_env=runtime_env, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = options.actors or gpus or 2
        resources = {"num_gpus": 1} if gpus else {"num_cpus": options.threads}
        actor = ray.remote(max_restarts=-1, max_task_retries=-1, **resources)(_Predictor)
        self.actors = [actor.remote(settings, params, connection, options.threads) for _ in range(count)]
        logger.info("%d Ray actor(s) (%s), batches of %d, %d in flight per actor", count,
                    f"{gpus} GPU(s)" if gpus else f"{options.threads} CPU thread(s) each", options.batch_size,
                    options.in_flight)

    def __call__(self, tasks: Iterator[dict]) -> Iterator[tuple[dict, TaskOutcome]]:
        import ray

        batches = batched(tasks, self.options.batch_size)
        pending: dict = {}  # object ref -> (actor index, batch)
        load = [0] * len(self.actors)
        exhausted = False
        while True:
            while not exhausted:
                index = min(range(len(self.actors)), key=load.__getitem__)
                if load[index] >= self.options.in_flight:
                    break
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                pending[self.actors[index].predict.remote(batch)] = (index, batch)
                load[index] += 1
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index, batch = pending.pop(ref)
                load[index] -= 1
                yield from zip(batch, ray.get(ref), strict=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        import ray

        for actor in self.actors:
            ray.kill(actor)
        if self._started_cluster:
            ray.shutdown()
