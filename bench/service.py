"""Engine service: status polling latency under 50 concurrent pollers, and time from submission to first progress.

A real ``keyframe-worlds serve`` subprocess on loopback runs a long ``preview``
job while 50 client threads (one keep-alive session each) poll its status.
Side by side, in the same run:

- ``GET /v1/jobs/{id}`` (the status route, answered in the event loop),
- ``GET /v1/health`` (a route served through the thread pool),
- reading the job's ``status.json`` straight from disk (what a client on the
  same file system could do without HTTP).

Time to first progress: from ``POST /v1/jobs`` to the first status that shows
a finished frame, median of 5 jobs; beside it, ``run_job`` called in-process
(no service) from its call to its first frame report.

    .venv/bin/python bench/service.py [--pollers 50] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_result  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def poll(fn, pollers: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(pollers)
    stop_at = [0.0]

    def worker():
        state = fn()  # per-thread setup (a session), returns the callable
        mine = []
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            state()
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    stop_at[0] = time.perf_counter() + seconds + 1.0
    threads = [threading.Thread(target=worker) for _ in range(pollers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    import requests

    from keyframe_worlds.bridge.spec import load_job
    from keyframe_worlds.bridge.jobs import Progress
    from keyframe_worlds.engine.run.runner import run_job
    from keyframe_worlds.engine.testing.service import Engine, write_preview_job

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        long_spec = write_preview_job(tmp / "long", frames=4000, segment_length=16, width=64, height=48)
        short_spec = write_preview_job(tmp / "short", frames=16, segment_length=16, width=64, height=48)
        with Engine(tmp / "jobs", extra_args=("--device", "cpu", "--queue-size", "64")) as engine:
            client = engine.start()
            job = client.submit(long_spec)
            while client.status(job.id).frames_done < 1:
                time.sleep(0.01)
            headers = {"Authorization": f"Bearer {engine.token}"}
            status_url, health_url = f"{engine.url}/v1/jobs/{job.id}", f"{engine.url}/v1/health"
            status_file = engine.job_root / job.id / "status.json"

            def http(url):
                def setup():
                    session = requests.Session()
                    session.headers.update(headers)
                    return lambda: session.get(url, timeout=30).raise_for_status()
                return setup

            def from_file():
                return lambda: json.loads(status_file.read_text())

            figures = {}
            for label, setup in (("status", http(status_url)), ("health", http(health_url)), ("file", from_file)):
                samples = poll(setup, args.pollers, args.seconds)
                p50, p99 = percentile(samples, 50) * 1000, percentile(samples, 99) * 1000
                rate = len(samples) / (args.seconds + 1.0)
                figures[label] = (p50, p99)
                print(f"{label:>7}: {len(samples):6d} requests by {args.pollers} pollers, p50 {p50:7.2f} ms, p99 {p99:7.2f} ms, {rate:7.0f}/s")
            still = client.status(job.id)
            print(f"the long job kept running meanwhile: {still.frames_done} frames done, state {still.state}")
            client.cancel(job.id)
            client.wait(job.id, timeout=60, poll_s=0.05)

            firsts = []
            for _ in range(5):
                t0 = time.perf_counter()
                submitted = client.submit(short_spec)
                while client.status(submitted.id).frames_done < 1:
                    time.sleep(0.002)
                firsts.append(time.perf_counter() - t0)
                client.wait(submitted.id, timeout=60, poll_s=0.05)
            first_progress = statistics.median(firsts)
            print(f"submission to first progress (service): median {first_progress * 1000:.1f} ms of {[round(f * 1000, 1) for f in firsts]}")

        class First(Progress):
            def report(self, event):
                if event.stage == "generate" and event.done >= 1 and self.at is None:
                    self.at = time.perf_counter()

        spec = load_job(short_spec)
        direct = []
        for i in range(5):
            reporter = First()
            reporter.at = None
            t0 = time.perf_counter()
            run_job(spec, tmp / f"direct{i}", progress=reporter)
            direct.append(reporter.at - t0)
        print(f"call to first progress (run_job in-process, no service): median {statistics.median(direct) * 1000:.1f} ms")

    print_result(p50_ms=figures["status"][0], p99_ms=figures["status"][1], first_progress_s=first_progress,
                 health_p50_ms=figures["health"][0], health_p99_ms=figures["health"][1],
                 file_p50_ms=figures["file"][0], file_p99_ms=figures["file"][1],
                 direct_first_progress_s=statistics.median(direct), pollers=args.pollers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
