"""scheduler.py: passes in order of urgency, admission by deadline, the drop of a request whose client hung up or
whose deadline passed while it waited, and the socket check behind that."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from scheduler import Busy, Dropped, Scheduler, peer_connected


class Clock:
    """A clock the test moves by hand (admission arithmetic without sleeping)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def learn(scheduler: Scheduler, clock: Clock, kind: str, seconds: float) -> None:
    """One request of `kind` whose single pass took `seconds` of the test's clock."""
    with scheduler.ticket(kind) as ticket, ticket.model_pass():
        clock.now += seconds


def start_waiting(scheduler: Scheduler, kind: str, order: list, **kwargs) -> threading.Thread:
    """A thread that takes a ticket and a pass, recording its kind when its pass runs (or the error)."""

    def run():
        try:
            with scheduler.ticket(kind, **kwargs) as ticket, ticket.model_pass():
                order.append(kind)
        except Busy as e:
            order.append(type(e).__name__)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def hold(scheduler: Scheduler, kind: str, order: list) -> tuple[threading.Thread, threading.Event]:
    """A thread whose pass of `kind` holds its slot until the event is set."""
    release = threading.Event()

    def run():
        with scheduler.ticket(kind) as ticket, ticket.model_pass():
            release.wait(5)
            order.append(kind)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, release


def test_a_free_slot_goes_to_the_most_urgent_waiter_then_the_oldest_and_clicks_have_a_lane():
    scheduler = Scheduler(concurrency=1)
    order = []
    job, release = hold(scheduler, "job", order)  # holds the only slot until released
    wait_for(lambda: scheduler.snapshot()["running"] == 1)
    threads = [job]
    for n, kind in enumerate(("batch", "prompt", "batch", "prompt"), 1):
        threads.append(start_waiting(scheduler, kind, order))
        wait_for(lambda n=n: sum(scheduler.snapshot()["waiting"].values()) == n)  # queued in this order
    threads.append(start_waiting(scheduler, "click", order))
    wait_for(lambda: order == ["click"])  # in the click lane, past the job's pass and the queue
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == ["click", "job", "prompt", "prompt", "batch", "batch"]


def test_the_click_lane_holds_one_click():
    scheduler = Scheduler(concurrency=1)
    order = []
    job, release_job = hold(scheduler, "job", order)
    wait_for(lambda: scheduler.snapshot()["running"] == 1)
    click, release_click = hold(scheduler, "click", order)
    wait_for(lambda: scheduler.snapshot()["running"] == 2)  # the lane
    second = start_waiting(scheduler, "click", order)
    wait_for(lambda: scheduler.snapshot()["waiting"]["click"] == 1)  # no third slot
    release_click.set()
    for thread in (click, second):
        thread.join(5)
    assert order == ["click", "click"] and scheduler.snapshot()["running"] == 1
    release_job.set()
    job.join(5)


def test_concurrency_runs_that_many_passes_at_once():
    scheduler = Scheduler(concurrency=2)
    inside, peak, lock = [0], [0], threading.Lock()

    def work():
        with scheduler.ticket("prompt") as ticket, ticket.model_pass():
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert peak[0] == 2


def test_a_request_that_cannot_finish_by_its_deadline_is_refused_at_once():
    clock = Clock()
    scheduler = Scheduler(clock=clock)
    learn(scheduler, clock, "prompt", 4.0)
    learn(scheduler, clock, "click", 0.1)
    tickets = []
    for _ in range(5):  # admitted, not yet run: 5 x 4 s of prompt work queued
        manager = scheduler.ticket("prompt", deadline=clock.now + 90)
        tickets.append((manager, manager.__enter__()))
    # 20 s queued + its own 4 s fits 22 s? No: refused, and told when to come back.
    with pytest.raises(Busy, match="would take 20 s and its own 4 s, past its deadline 22 s from now") as refused:
        with scheduler.ticket("prompt", deadline=clock.now + 22):
            pass
    assert refused.value.retry_after == 20
    with scheduler.ticket("prompt", deadline=clock.now + 25):  # 20 + 4 fits
        pass
    # A click is more urgent: the prompt work queued isn't ahead of it.
    with scheduler.ticket("click", deadline=clock.now + 1):
        pass
    # A batch is elastic: it is admitted when one pass fits after the work ahead.
    learn(scheduler, clock, "batch", 60.0)
    with scheduler.ticket("batch", deadline=clock.now + 21 + 60 - 1):
        pass
    with pytest.raises(Busy):
        with scheduler.ticket("batch", deadline=clock.now + 19):
            pass
    for manager, _ in tickets:
        manager.__exit__(None, None, None)
    assert scheduler.snapshot()["refused"] == {"deadline": 2}
    with scheduler.ticket("prompt", deadline=clock.now + 5):  # the queue is empty again
        pass


def test_the_queue_limit_refuses_past_it_and_jobs_are_never_refused():
    scheduler = Scheduler(queue_limit=2)
    with scheduler.ticket("click"), scheduler.ticket("prompt"):
        with pytest.raises(Busy, match="2 requests are queued for the model"):
            with scheduler.ticket("click"):
                pass
        with scheduler.ticket("job") as job, job.model_pass():
            pass
    assert scheduler.snapshot()["refused"] == {"queue full": 1}


def test_a_waiting_request_is_dropped_when_its_client_hangs_up_or_its_deadline_passes():
    scheduler = Scheduler()
    order, release, connected = [], threading.Event(), threading.Event()
    connected.set()

    def hold():
        with scheduler.ticket("job") as ticket, ticket.model_pass():
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    wait_for(lambda: scheduler.snapshot()["running"] == 1)
    gone = start_waiting(scheduler, "batch", order, connected=connected.is_set)
    late = start_waiting(scheduler, "prompt", order, deadline=time.monotonic() + 0.3)
    wait_for(lambda: sum(scheduler.snapshot()["waiting"].values()) == 2)
    connected.clear()  # the client hangs up
    late.join(5)
    gone.join(5)
    assert sorted(order) == ["Dropped", "Dropped"]
    assert scheduler.snapshot()["refused"] == {"client gone": 1, "deadline passed": 1}
    assert sum(scheduler.snapshot()["waiting"].values()) == 0  # left the queue
    release.set()
    holder.join(5)
    assert issubclass(Dropped, Busy)


def test_a_pass_that_would_end_past_the_deadline_is_not_started():
    """A batch admitted in time, then kept waiting by more urgent work: once its next pass (as long as that model's
    passes of its kind lately, not the kind's mean over short SAM and long Grounding DINO passes) would end past its
    deadline, it is dropped before that pass, not answered after the client left."""
    now = [0.0]
    scheduler = Scheduler(clock=lambda: now[0])
    scheduler.pass_seconds["batch"] = 5.5  # the mean of the two below
    scheduler.model_seconds.update({("batch", "detector"): 10.0, ("batch", "segmenter"): 1.0})
    order = []

    def detector_pass():
        try:
            with scheduler.ticket("batch", deadline=30.0) as ticket, ticket.model_pass("detector"):
                order.append("batch")
        except Busy as e:
            order.append(type(e).__name__)

    holder, release = hold(scheduler, "prompt", order)
    wait_for(lambda: scheduler.snapshot()["running"] == 1)
    waiting = threading.Thread(target=detector_pass)
    waiting.start()
    wait_for(lambda: scheduler.snapshot()["waiting"]["batch"] == 1)
    now[0] = 19.0  # a detector pass of 10 s would end at 29 s: still in time
    time.sleep(0.5)
    assert order == [] and scheduler.snapshot()["waiting"]["batch"] == 1
    now[0] = 21.0  # it would end at 31 s, past the deadline at 30 s (the kind's mean, 5.5 s, would still fit)
    waiting.join(5)
    assert order == ["Dropped"] and scheduler.snapshot()["refused"] == {"deadline passed": 1}
    release.set()
    holder.join(5)


def test_a_nested_pass_runs_in_the_outer_ones_slot_and_time_is_learnt_per_kind():
    clock = Clock()
    scheduler = Scheduler(clock=clock)
    with scheduler.ticket("prompt") as ticket:
        with ticket.model_pass():
            clock.now += 1
            with ticket.model_pass():  # would deadlock with one slot if it queued
                clock.now += 1
        with ticket.model_pass():
            clock.now += 3
    assert ticket.used == 5
    assert scheduler.snapshot()["expected_seconds"] == {"prompt": 5}
    learn(scheduler, clock, "prompt", 15)
    assert scheduler.snapshot()["expected_seconds"] == {"prompt": 8}  # 0.7 * 5 + 0.3 * 15


def test_a_jobs_host_work_defers_to_admitted_labelers_and_only_a_jobs():
    scheduler = Scheduler()
    done = threading.Event()
    with scheduler.ticket("job") as job:
        with scheduler.ticket("click"):
            with scheduler.ticket("batch", deadline=time.monotonic() + 90) as batch:
                batch.defer()  # a Retrieve Predictions' host work is part of its answer: at once, click or not
            waiter = threading.Thread(target=lambda: (job.defer(), done.set()))
            waiter.start()
            assert not done.wait(0.3)
        assert done.wait(5)
        waiter.join()


def test_peer_connected_sees_a_closed_client():
    ours, theirs = socket.socketpair()
    try:
        assert peer_connected(ours)
        theirs.sendall(b"GET / HTTP/1.1\r\n")  # a pipelined request: still there
        assert peer_connected(ours)
        assert ours.recv(100)
        theirs.close()
        assert not peer_connected(ours)
    finally:
        ours.close()
    assert not peer_connected(ours)  # closed on our side
    assert peer_connected(None)


def test_expected_time_is_learnt_per_task():
    """A request's model time is learnt per task (image) and expected in proportion to its tasks: a Retrieve
    Predictions of four images is expected to take four times one image's time."""
    clock = Clock()
    scheduler = Scheduler(clock=clock)
    with scheduler.ticket("prompt", tasks=2) as ticket, ticket.model_pass():
        clock.now += 6
    assert scheduler.snapshot()["expected_seconds"] == {"prompt": 3}
    with scheduler.ticket("prompt", tasks=4, deadline=clock.now + 100):
        with pytest.raises(Busy, match="would take 12 s and its own 3 s"):
            with scheduler.ticket("prompt", deadline=clock.now + 14):
                pass
