"""The one owner of a worker's models: every model pass of every request goes through its Scheduler.

    kinds     click (smart tools, the page's clicks: mostly SAM's light decoder on a cached embedding), prompt (the
              prompt box, the page's try-it), batch (Retrieve Predictions, a task opened), job (bulk jobs, in the
              background). A free slot goes to the waiting pass of the most urgent kind, then to the first come.
    slots     MODEL_CONCURRENCY passes at once (default 1: a GPU runs one batched pass at a time, and one pass on a
              CPU already uses all its cores), and a lane for one click more: a click (mostly SAM's light decoder)
              never waits for another request's pass. A request holds a slot only for a pass, so image downloads
              and host work (mask clean-up, RLE) run beside the passes.
    deadline  every foreground request has one (REQUEST_DEADLINE after it arrived, under Label Studio's 100 s).
              A request that can't be served by then, judged from the work admitted ahead of it and the model time
              its kind took lately, is refused at once (Busy: HTTP 503 with Retry-After); so is one arriving while
              QUEUE_LIMIT requests wait. One whose client hung up while it waited, or whose deadline passed or
              would before its next pass ended (that model's pass for its kind lately), is dropped before that pass
              (Dropped).
              Background jobs have none and are never refused.

A Ticket is one request's place: `with scheduler.ticket("prompt", deadline, connected) as ticket:` admits it (or
raises Busy), and `with ticket.model_pass():` wraps each pass. Passes of one ticket don't nest (a nested one runs
within the outer one's slot).
"""

from __future__ import annotations

import heapq
import itertools
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from errors import ServiceError

KINDS = ("click", "prompt", "batch", "job")  # most urgent first
FOREGROUND = KINDS[:-1]
EWMA_WEIGHT = 0.3  # of the newest request in a kind's expected model time per task
CHECK_EVERY_S = 0.2  # how often a waiting pass checks its client and deadline


class Busy(ServiceError):
    """The request can't be served within its deadline (or the queue is full): refused before any model work."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class Dropped(Busy):
    """The request's deadline passed (or would during its next pass), or its client hung up, while it waited:
    dropped before its next pass."""


def peer_connected(sock: socket.socket | None) -> bool:
    """Whether the client at the other end of `sock` (the request's connection) is still there: False once it has
    closed its side (a readable socket with nothing to read). None (no socket known): True."""
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except (OSError, ValueError):  # reset, or closed on our side
        return False


@dataclass
class Caller:
    """Who waits for a request's answer: when the request arrived (time.monotonic()) and whether its client is still
    connected (the HTTP layer knows both); `kind`: what the scheduler ran it as, once known (for the metrics)."""

    arrived: float
    connected: Callable[[], bool] = field(default=lambda: True)
    kind: str = ""

    def deadline(self, within: float) -> float | None:
        """When the answer is due (time.monotonic()): `within` seconds of the arrival (REQUEST_DEADLINE); 0: never."""
        return self.arrived + within if within else None


@dataclass(eq=False)
class Ticket:
    """One request's place in the scheduler. deadline: a time.monotonic() (None: none); connected: whether its
    client still waits for the answer."""

    scheduler: Scheduler
    kind: str
    deadline: float | None = None
    connected: Callable[[], bool] = field(default=lambda: True)
    admitted: float = 0.0
    tasks: int = 1  # images it asks about (a Retrieve Predictions may send several)
    used: float = 0.0  # seconds of model passes so far
    _depth: int = 0  # passes entered and not left (a nested pass runs within the outer one's slot)

    @property
    def priority(self) -> int:
        return KINDS.index(self.kind)

    @property
    def expected(self) -> float:
        """Seconds of model work this request is expected to take in all, from its kind's recent requests."""
        return self.scheduler.expected.get(self.kind, 0.0) * self.tasks

    @contextmanager
    def model_pass(self, model: str = "") -> Iterator[None]:
        """Hold one of the scheduler's slots while the block runs a pass of `model` (detector, segmenter: for the
        metrics). Raises Dropped, before the pass, when the deadline passed or the client hung up while it waited."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        waited = self.scheduler._acquire(self, model)
        self._depth, started = 1, self.scheduler.clock()
        try:
            yield
        finally:
            self._depth = 0
            self.scheduler._release(self, model, waited, self.scheduler.clock() - started)

    def defer(self) -> None:
        """A bulk job's: wait while a labeler's request is admitted (its host work leaves the CPU to labelers). A
        foreground request's host work is part of an answer due by its deadline: it never waits."""
        if self.kind == "job":
            self.scheduler._defer(self)


class Unscheduled:
    """What a Pipeline uses without a scheduler (the command line, a Ray actor): passes run at once."""

    kind = "job"

    @contextmanager
    def model_pass(self, model: str = "") -> Iterator[None]:
        yield

    def defer(self) -> None:
        pass


UNSCHEDULED = Unscheduled()


class Scheduler:
    """Model passes by kind and arrival, `concurrency` at once; admission by deadline. Thread-safe."""

    def __init__(self, concurrency: int = 1, queue_limit: int = 64, clock: Callable[[], float] = time.monotonic):
        self.concurrency, self.queue_limit, self.clock = concurrency, queue_limit, clock
        self._cond = threading.Condition()
        self._admitted: list[Ticket] = []  # foreground tickets between admission and their end, in arrival order
        self._waiting: list[tuple[int, int, Ticket]] = []  # heap of (priority, arrival, ticket)
        self._running: dict[Ticket, tuple[float, bool]] = {}  # ticket -> (when its pass started, in the click lane)
        self._order = itertools.count()
        self.expected: dict[str, float] = {}  # kind -> model seconds of a request per task, lately (EWMA)
        self.pass_seconds: dict[str, float] = {}  # kind -> seconds of one pass, lately (EWMA)
        self.model_seconds: dict[tuple[str, str], float] = {}  # (kind, model) -> the same, by model
        self.refused: dict[str, int] = {}  # reason -> count
        self.served: dict[str, int] = {}  # kind -> requests answered
        # Told of every pass: (model, kind, seconds waited for the slot, seconds of the pass).
        self.on_pass: Callable[[str, str, float, float], None] = lambda model, kind, waited, seconds: None

    # ------------------------------------------------------------------ admission

    def background(self) -> Ticket:
        """A bulk job's ticket: the least urgent, no deadline, never refused, not counted ahead of anyone."""
        return Ticket(self, "job", admitted=self.clock())

    @contextmanager
    def ticket(self, kind: str, deadline: float | None = None, connected: Callable[[], bool] | None = None,
               tasks: int = 1) -> Iterator[Ticket]:
        """Admit a request of `kind` about `tasks` images for the block (Busy when it can't be served by
        `deadline`); its model time per task is learnt for its kind when the block ends."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "job":
            yield self.background()
            return
        ticket = Ticket(self, kind, deadline, connected or (lambda: True), self.clock(), max(tasks, 1))
        with self._cond:
            self._admit(ticket)
            self._admitted.append(ticket)
        completed = False
        try:
            yield ticket
            completed = True
        finally:
            with self._cond:
                self._admitted.remove(ticket)
                if completed:
                    self.served[kind] = self.served.get(kind, 0) + 1
                if completed and ticket.used > 0:
                    self.expected[kind] = _ewma(self.expected.get(kind), ticket.used / ticket.tasks)
                self._cond.notify_all()

    def _admit(self, ticket: Ticket) -> None:
        if len(self._admitted) >= self.queue_limit:
            self._refuse("queue full", f"{len(self._admitted)} requests are queued for the model (QUEUE_LIMIT)",
                         self.wait_ahead(ticket))
        if ticket.deadline is None:
            return
        ahead = self.wait_ahead(ticket)
        # A batch is elastic (PREDICT_TIME_BUDGET fits its tasks to the time left): it needs one pass in time.
        own = self.pass_seconds.get("batch", 0.0) if ticket.kind == "batch" else ticket.expected
        if ticket.admitted + ahead + own > ticket.deadline:
            self._refuse("deadline", f"busy: the model work queued ahead of this {ticket.kind} request would take "
                         f"{ahead:.0f} s and its own {own:.0f} s, past its deadline "
                         f"{max(ticket.deadline - ticket.admitted, 0):.0f} s from now", ahead)

    def _refuse(self, reason: str, message: str, retry_after: float, error: type[Busy] = Busy):
        self.refused[reason] = self.refused.get(reason, 0) + 1
        raise error(f"{message}; try again in a moment", retry_after)

    def wait_ahead(self, ticket: Ticket) -> float:
        """Seconds of model work to be done before `ticket`'s: what is left of the passes running now, and the
        expected model time left of every admitted request as urgent and older (spread over the slots). Call with
        the lock held."""
        now, left = self.clock(), 0.0
        for other, (started, lane) in self._running.items():
            # Less urgent: only its pass in flight is ahead (and not of a click, which has its lane).
            if other.priority > ticket.priority and (lane or ticket.kind != "click"):
                left += max(self.pass_seconds.get(other.kind, 0.0) - (now - started), 0.0)
        for other in self._admitted:
            if other is not ticket and other.priority <= ticket.priority:
                left += max(other.expected - other.used, 0.0)
        return left / self.concurrency

    # ------------------------------------------------------------------ passes

    def _slot_for(self, ticket: Ticket) -> str | None:
        """'regular' or 'lane' when a slot is free for `ticket`'s pass, else None. Call with the lock held."""
        if sum(1 for _, lane in self._running.values() if not lane) < self.concurrency:
            return "regular"
        if ticket.kind == "click" and not any(lane for _, lane in self._running.values()):
            return "lane"
        return None

    def _acquire(self, ticket: Ticket, model: str = "") -> float:
        """Wait for a slot, the most urgent and oldest waiter first; returns the seconds waited."""
        entry = (ticket.priority, next(self._order), ticket)
        waited_from = self.clock()
        with self._cond:
            heapq.heappush(self._waiting, entry)
            try:
                while self._waiting[0] is not entry or (slot := self._slot_for(ticket)) is None:
                    self._cond.wait(CHECK_EVERY_S)
                    self._check(ticket, model)
                self._check(ticket, model)
            except Dropped:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            now = self.clock()
            self._running[ticket] = (now, slot == "lane")
            self._cond.notify_all()  # the next waiter may take another free slot
        return now - waited_from

    def _check(self, ticket: Ticket, model: str = "") -> None:
        """Raise Dropped when the ticket's client is gone, or its deadline has passed or would before its next pass
        ends (a pass of `model` for its kind lately: a batch's Grounding DINO pass takes far longer than its SAM
        pass; the answer would come after the client gave up, so nobody would read it)."""
        expected = self.model_seconds.get((ticket.kind, model), self.pass_seconds.get(ticket.kind, 0.0))
        if ticket.deadline is not None and self.clock() + expected > ticket.deadline:
            self._refuse("deadline passed", f"busy: this {ticket.kind} request could not be answered before its "
                         f"deadline ({ticket.deadline - ticket.admitted:.0f} s)", 0, Dropped)
        if not ticket.connected():
            self._refuse("client gone", f"the client of this {ticket.kind} request hung up while it waited", 0,
                         Dropped)

    def _release(self, ticket: Ticket, model: str, waited: float, seconds: float) -> None:
        with self._cond:
            self._running.pop(ticket, None)
            ticket.used += seconds
            self.pass_seconds[ticket.kind] = _ewma(self.pass_seconds.get(ticket.kind), seconds)
            self.model_seconds[ticket.kind, model] = _ewma(self.model_seconds.get((ticket.kind, model)), seconds)
            self._cond.notify_all()
        self.on_pass(model, ticket.kind, waited, seconds)

    def _defer(self, ticket: Ticket) -> None:
        with self._cond:
            while any(other.priority < ticket.priority for other in self._admitted):
                self._cond.wait(CHECK_EVERY_S)

    # ------------------------------------------------------------------ state

    def snapshot(self) -> dict:
        """Queue depth and passes running by kind, the expected model time of each kind, requests served by kind,
        refusals by reason."""
        with self._cond:
            waiting = {kind: sum(1 for _, _, t in self._waiting if t.kind == kind) for kind in KINDS}
            admitted = {kind: sum(1 for t in self._admitted if t.kind == kind) for kind in FOREGROUND}
            return {"concurrency": self.concurrency, "queue_limit": self.queue_limit, "admitted": admitted,
                    "waiting": waiting, "running": len(self._running),
                    "expected_seconds": {k: round(v, 3) for k, v in self.expected.items()},
                    "served": dict(self.served), "refused": dict(self.refused)}


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new
