"""A team at once: the service under Locust (benchmarks/locustfile.py: labelers on the prompt box and smart clicks,
Retrieve Predictions, bad input, /health), with a bulk job running alongside, at several numbers of users; the code
before the scheduler (--before, a git revision) and now, in the same run, on the same machine and models.

Each (users, code) run starts the service as gunicorn.conf.py starts it (one worker, the code's own THREADS default)
with the test suite's small random-weight Grounding DINO and MobileSAM on CPU, a loopback image server (a fresh
320x240 picture per prompt) and an imitation of Label Studio's API for the job (tests/fake_label_studio.py), then
runs Locust headless for --seconds and lets requests in flight finish or give up at 100 s, as Label Studio does.
Per kind of request it prints p50 and p95 of the answered ones, refusals (503), requests given up at 100 s and
answers per second, and the worker's peak RSS.

    --flood N     also: N users for 90 s, then how long after the last of them left a click is answered at idle
                  speed again, and the longest request
    --soak-minutes M   also (the current code only): 6 users and a job for M minutes over fresh images, the
                  worker's RSS, glibc's heap and the embedding cache every 30 s, and 5-minute means after warm-up;
                  then the job cancelled, the RSS once the quiet worker has trimmed its heap

Locust (pinned in benchmarks/locust-requirements.txt) lives in a virtualenv of its own, .venv-locust, built on the
first run: its gevent stays out of the service's. Nothing leaves 127.0.0.1.

    .venv/bin/python benchmarks/bench_load.py [--users 1,4,8,16,32] [--seconds 60] [--before a3ef812]
                                              [--flood 28] [--soak-minutes 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import psutil
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_gpu import generate  # noqa: E402
from fake_label_studio import FakeLabelStudio  # noqa: E402
from model_factory import make_image  # noqa: E402
from servers import LoopbackServer  # noqa: E402
from test_labeling import GUIDE_CONFIG  # noqa: E402

from logs import silence_third_party_warnings  # noqa: E402

LOCUST_VENV = ROOT / ".venv-locust"
LOCUST_REQUIREMENTS = ROOT / "benchmarks" / "locust-requirements.txt"
KINDS = ("click", "first click", "prompt", "batch", "bad input", "health")
CLICK_IMAGES = 3
JOB_TASKS = 100_000  # more than any run gets through: the job runs for the whole run
IMAGE_URL = "/data/upload/1/img-{}.png"


def ensure_locust() -> Path:
    """The `locust` executable of .venv-locust, built first from benchmarks/locust-requirements.txt when missing or
    built from another version of that file."""
    stamp = LOCUST_VENV / ".installed"
    digest = hashlib.sha256(LOCUST_REQUIREMENTS.read_bytes()).hexdigest()
    if not (stamp.exists() and stamp.read_text() == digest):
        print(f"bench_load: installing Locust into {LOCUST_VENV.name} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(LOCUST_VENV)], check=True)
        subprocess.run([str(LOCUST_VENV / "bin" / "pip"), "install", "--disable-pip-version-check", "-q",
                        "-r", str(LOCUST_REQUIREMENTS)], check=True)
        stamp.write_text(digest)
    return LOCUST_VENV / "bin" / "locust"


class Pictures(LoopbackServer):
    """/data/upload/1/img-<n>.png: picture n, 320x240, made on request (a project of any size, in no memory)."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                try:
                    body = picture(int(name.removeprefix("img-").removesuffix(".png")))
                except ValueError:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


@lru_cache(maxsize=64)
def picture(n: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(make_image(320, 240, seed=n)).save(out, "PNG", compress_level=1)
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`gunicorn _wsgi:app` from `source` (a checkout of the code), models loaded, until stopped."""

    def __init__(self, source: Path, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "gunicorn"), "_wsgi:app"], cwd=source,
                                     env={**env, "HOST": "127.0.0.1", "PORT": str(self.port)},
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/health", timeout=2).json().get("models") == "ready":
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_load: the service did not start (log: {log})")
            time.sleep(0.5)

    def rss(self) -> int:
        """Bytes resident in the worker processes (gunicorn's children)."""
        try:
            return sum(child.memory_info().rss for child in psutil.Process(self.proc.pid).children())
        except psutil.Error:
            return 0

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def click_seconds(url: str) -> float:
    """One smart click's answer time (seconds), as the locustfile sends it; infinity when it is not answered."""
    payload = {"tasks": [{"id": 1, "data": {"image": IMAGE_URL.format(0)}}], "project": "1.1700000000",
               "label_config": CLICK_CONFIG, "params": {"context": {"result": [
                   {"value": {"x": 40, "y": 40, "width": 0.6, "keypointlabels": ["cats"]}, "id": "k",
                    "from_name": "kp", "to_name": "image", "type": "keypointlabels", "origin": "manual",
                    "is_positive": True}]}}}
    started = time.perf_counter()
    try:
        answered = requests.post(url + "/predict", json=payload, timeout=120).status_code == 200
    except requests.RequestException:
        answered = False
    return time.perf_counter() - started if answered else float("inf")


CLICK_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cats"/></KeyPointLabels>
  <BrushLabels name="label2" toName="image"><Label value="cats"/></BrushLabels>
</View>"""


def submit_job(service: Service, label_studio: FakeLabelStudio) -> str:
    """A bulk job over the whole imitated project; its id."""
    response = requests.post(service.url + "/jobs", timeout=30, headers={"X-Label-Studio-Key": label_studio.token},
                             json={"project": 1, "prompt": "shape_cats", "all": True,
                                   "label_studio_url": label_studio.url})
    if response.status_code != 201:
        raise SystemExit(f"bench_load: the job was refused: {response.status_code} {response.text[:300]}")
    return response.json()["id"]


def rss_once_quiet(service: Service, label_studio: FakeLabelStudio, job_id: str, timeout: float = 300
                   ) -> tuple[float, int]:
    """Cancel the job, then wait for the worker's first heap trim (it trims once quiet, heap.py): (seconds waited,
    the worker's RSS then); at `timeout`, the RSS as it is."""
    requests.delete(f"{service.url}/jobs/{job_id}", timeout=30, headers={"X-Label-Studio-Key": label_studio.token})

    def trims() -> float:
        return scrape(service).get("grounded_sam_heap_trims", 0.0)

    started, before = time.monotonic(), trims()
    while time.monotonic() - started < timeout and trims() == before:
        time.sleep(2)
    return time.monotonic() - started, service.rss()


def run_locust(locust: Path, url: str, users: int, seconds: float, records: Path, stop_timeout: int = 100) -> float:
    """Locust headless against `url`; returns when its last user stopped (time.monotonic)."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "LANG": "C.UTF-8",
           "LOAD_IMAGE_URL": IMAGE_URL, "LOAD_CLICK_IMAGES": str(CLICK_IMAGES), "LOAD_RECORDS": str(records)}
    subprocess.run([str(locust), "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless", "--only-summary",
                    "-u", str(users), "-r", str(users), "-t", f"{int(seconds)}s", "--stop-timeout", str(stop_timeout),
                    "--host", url, "--loglevel", "WARNING"], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic()


def summarise(records: Path, seconds: float) -> dict:
    """kind -> {answered, p50, p95, max, refused, gave_up, other, per_s} from the locustfile's records."""
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    out = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        answered = sorted(r["seconds"] for r in mine if r["outcome"] == "answered")
        out[kind] = {
            "answered": len(answered),
            "p50": statistics.median(answered) if answered else None,
            "p95": answered[min(len(answered) - 1, int(0.95 * len(answered)))] if answered else None,
            "max": max((r["seconds"] for r in mine), default=None),
            "refused": sum(r["outcome"] == "refused" for r in mine),
            "gave_up": sum(r["outcome"] == "gave up" for r in mine),
            "other": sum(r["outcome"] not in ("answered", "refused", "gave up") for r in mine),
            "per_s": len(answered) / seconds,
        }
    return out


def scrape(service: Service) -> dict[str, float]:
    """The service's /metrics: each family's first sample by family name; {} when it can't be read or isn't
    Prometheus' format (the code before answers JSON)."""
    try:
        text = requests.get(service.url + "/metrics", timeout=5).text
        return {m.name: m.samples[0].value for m in text_string_to_metric_families(text) if m.samples}
    except (requests.RequestException, ValueError):
        return {}


class RssSampler:
    """Every `every` s on a thread, until stopped: the worker's RSS and, from its /metrics, glibc's bytes in use and
    freed-but-kept and the embedding cache's bytes (0 where a figure is missing)."""

    GAUGES = {"in_use": "grounded_sam_heap_in_use_bytes", "free": "grounded_sam_heap_free_bytes",
              "cache": "grounded_sam_cache_bytes"}

    def __init__(self, service: Service, every: float = 2.0):
        self.samples: list[dict] = []
        self._stop = threading.Event()
        started = time.monotonic()

        def run():
            while not self._stop.wait(every):
                sample = {"t": time.monotonic() - started, "rss": service.rss()}
                values = scrape(service)
                sample.update({key: values.get(name, 0.0) for key, name in self.GAUGES.items()})
                self.samples.append(sample)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return self.samples


def windows(samples: list[dict], key: str, after: float, width: float = 300) -> list[float]:
    """Means of samples[key] over consecutive `width`-second windows from `after` s on (whole windows only)."""
    out = []
    start = after
    while True:
        inside = [s[key] for s in samples if start <= s["t"] < start + width]
        if not inside or start + width > samples[-1]["t"] + 1:
            return out
        out.append(statistics.fmean(inside))
        start += width


def checkout(rev: str, into: Path) -> Path:
    """The repository at `rev` (git archive), for the 'before' service."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}" if seconds < 10 else f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="1,4,8,16,32")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--before", default="a3ef812",
                        help="git revision of the code before the scheduler ('' to skip)")
    parser.add_argument("--flood", type=int, default=0, help="users of the flood run (0: none)")
    parser.add_argument("--soak-minutes", type=float, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    silence_third_party_warnings()
    locust = ensure_locust()
    results: dict = {"users": {}, "flood": {}, "soak": {}}

    def save():
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory() as tmp, Pictures() as pictures, FakeLabelStudio(
            GUIDE_CONFIG, task_source=lambda page, size: [
                {"id": i, "data": {"image": pictures.url + IMAGE_URL.format(10**6 + i)}, "predictions": []}
                for i in range((page - 1) * size + 1, min(page * size, JOB_TASKS) + 1)]) as label_studio:
        tmp = Path(tmp)
        models = generate(ROOT / "artifacts" / "bench-load-models", quick=True)
        base_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "THREADS"))},
                    **models, "USE_MOBILE_SAM": "true", "DEVICE": "cpu", "MAX_DETECTIONS": "5",
                    "LABEL_STUDIO_URL": pictures.url, "LABEL_STUDIO_API_KEY": "bench", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        sources = {"now": ROOT}
        if args.before:
            sources = {"before": checkout(args.before, tmp / "before"), **sources}

        def serve(code: str, name: str) -> Service:
            data = tmp / f"data-{name}"
            return Service(sources[code], {**base_env, "DATA_DIR": str(data)}, tmp / f"{name}.log")

        idle = {}
        for code in sources:
            service = serve(code, f"{code}-idle")
            try:
                click_seconds(service.url)  # the embedding
                idle[code] = min(click_seconds(service.url) for _ in range(5))
            finally:
                service.stop()
        results["idle_click_s"] = idle
        print("idle click, s: " + ", ".join(f"{code} {s:.3f}" for code, s in idle.items()), flush=True)

        for users in [int(u) for u in args.users.split(",") if u]:
            for code in sources:
                service = serve(code, f"{code}-{users}")
                try:
                    submit_job(service, label_studio)
                    records = tmp / f"{code}-{users}.jsonl"
                    sampler = RssSampler(service)
                    started = time.monotonic()
                    run_locust(locust, service.url, users, args.seconds, records)
                    rss = sampler.stop()
                    row = summarise(records, args.seconds)
                    row["rss_peak_mb"] = max((r["rss"] for r in rss), default=0) / 2**20
                    row["wall_s"] = time.monotonic() - started
                    results["users"].setdefault(str(users), {})[code] = row
                    save()
                    print_row(users, code, row)
                finally:
                    service.stop()

        if args.flood:
            for code in sources:
                service = serve(code, f"{code}-flood")
                try:
                    records = tmp / f"{code}-flood.jsonl"
                    ended = run_locust(locust, service.url, args.flood, 90, records)
                    back = None
                    while time.monotonic() - ended < 300:
                        if click_seconds(service.url) <= 2 * idle[code] + 0.05:
                            back = time.monotonic() - ended
                            break
                        time.sleep(0.5)
                    row = summarise(records, 90)
                    longest = max((r["max"] or 0) for r in row.values())
                    results["flood"][code] = {"kinds": row, "click_idle_again_s": back, "longest_s": longest}
                    save()
                    print(f"flood of {args.flood}, {code}: longest request {longest:.1f} s, a click at idle speed "
                          f"{'never within 300' if back is None else f'{back:.1f}'} s after the last user left; "
                          + "; ".join(f"{k}: {v['answered']} answered, {v['refused']} refused, {v['gave_up']} gave "
                                      f"up" for k, v in row.items()), flush=True)
                finally:
                    service.stop()

        if args.soak_minutes:
            service = serve("now", "soak")
            try:
                job_id = submit_job(service, label_studio)
                sampler = RssSampler(service, every=30)
                run_locust(locust, service.url, 6, args.soak_minutes * 60, tmp / "soak.jsonl", stop_timeout=10)
                rss = sampler.stop()
                waited, quiet_rss = rss_once_quiet(service, label_studio, job_id)
                results["soak"] = {"memory_mb": [{k: round(v / 2**20) if k != "t" else round(v) for k, v in r.items()}
                                                  for r in rss],
                                   "quiet": {"waited_s": round(waited), "rss_mb": round(quiet_rss / 2**20)},
                                   "kinds": summarise(tmp / "soak.jsonl", args.soak_minutes * 60)}
                save()
                print(f"soak, 6 users and a job, {args.soak_minutes:g} min, every 2 min: MB RSS / heap in use / "
                      "heap freed and kept / embedding cache: "
                      + ", ".join(f"{r['t'] // 60:.0f}m {r['rss'] / 2**20:.0f}/{r['in_use'] / 2**20:.0f}/"
                                  f"{r['free'] / 2**20:.0f}/{r['cache'] / 2**20:.0f}" for r in rss[3::4]), flush=True)
                for key in ("rss", "in_use"):
                    means = windows(rss, key, after=300)
                    if means:
                        print(f"  {key}, 5-minute means after the first 5 minutes: "
                              + ", ".join(f"{m / 2**20:.0f}" for m in means)
                              + f" MB; highest {100 * (max(means) / min(means) - 1):.1f} % above lowest", flush=True)
                when = "no trim within 300 s" if waited >= 300 else f"its first trim once quiet, {waited:.0f} s later"
                print(f"  after the load (the job cancelled, {when}): RSS {quiet_rss / 2**20:.0f} MB", flush=True)
                print_row(6, "soak", {"rss_peak_mb": max(r["rss"] for r in rss) / 2**20, **results["soak"]["kinds"]})
            finally:
                service.stop()


def print_row(users: int, code: str, row: dict) -> None:
    print(f"{users} users, {code} (peak RSS {row['rss_peak_mb']:.0f} MB):", flush=True)
    for kind in KINDS:
        k = row[kind]
        print(f"  {kind:11} answered {k['answered']:4}  p50 {ms(k['p50']):>7}  p95 {ms(k['p95']):>7}  "
              f"refused {k['refused']:3}  gave up {k['gave_up']:3}  other {k['other']:2}  {k['per_s']:.2f}/s",
              flush=True)


if __name__ == "__main__":
    main()
