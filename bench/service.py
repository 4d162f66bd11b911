"""Engine service: status polls while a CPU-heavy job runs, the job's speed with and without pollers, time to first progress.

A real ``keyframe-worlds serve`` subprocess on loopback runs a long ``preview``
job in its worker process. Side by side, in the same run:

1. The job alone: its frames per second over a window with no client but one
   slow observer.
2. The same job while 50 pollers (one thread and keep-alive connection each, as
   50 add-on panels would be) each poll ``GET /v1/jobs/{id}`` every ``--interval``
   seconds (default 0.25 s, twice the add-on's rate): latency p50/p99 and the
   job's frames per second meanwhile. Windows alternate (alone, polled, alone,
   ...) and the ratio is the median of each polled window over its neighbours.
3. For comparison in that load: ``GET /v1/health`` and reading ``status.json``
   straight from disk; and the saturation figure: 50 pollers with no pause at
   all (requests per second the service answers, and their p99).

Time to first progress: from ``POST /v1/jobs`` to the first status that shows a
finished frame, median of 5 jobs; beside it, ``run_job`` in-process.

    .venv/bin/python bench/service.py [--pollers 50] [--seconds 4] [--rounds 4] [--interval 0.25]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_result  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def poll(fn, pollers: int, seconds: float, interval: float) -> list[float]:
    """Latencies of ``pollers`` threads each calling its ``fn()``-made callable every ``interval`` s for ``seconds``."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(pollers + 1)
    stop_at = [0.0]

    def worker(offset: float):
        call = fn()  # per-thread setup (a session), returns the callable
        mine = []
        start.wait()
        next_at = time.perf_counter() + offset
        while True:
            now = time.perf_counter()
            if now < next_at:
                time.sleep(next_at - now)
            if time.perf_counter() >= stop_at[0]:
                break
            t0 = time.perf_counter()
            call()
            mine.append(time.perf_counter() - t0)
            next_at += interval
        with lock:
            latencies.extend(mine)

    # pollers spread evenly over the interval, as independent panels would be
    threads = [threading.Thread(target=worker, args=(interval * i / pollers,)) for i in range(pollers)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds + 0.5
    start.wait()
    for t in threads:
        t.join()
    return latencies


def frames_per_second(client, job_id: str, seconds: float, during=None) -> float:
    """Frames the job finishes per second over ``seconds`` (while ``during()`` runs, if given)."""
    first = client.status(job_id)
    t0 = time.perf_counter()
    if during is None:
        time.sleep(seconds)
    else:
        during()
    last = client.status(job_id)
    return (last.frames_done - first.frames_done) / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one measuring window")
    parser.add_argument("--rounds", type=int, default=4, help="polled windows, each between two windows alone")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between one poller's requests")
    args = parser.parse_args()

    from keyframe_worlds.bridge.jobs import Progress
    from keyframe_worlds.bridge.spec import load_job
    from keyframe_worlds.engine.run.runner import run_job
    from keyframe_worlds.engine.testing.service import Engine, write_preview_job

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # CPU-heavy: 256x160 frames, rendered, filled and fused on the CPU by the worker process
        long_spec = write_preview_job(tmp / "long", frames=20000, segment_length=8, width=256, height=160)
        # A capped memory reaches its steady size (and the job its steady speed) within the warm-up.
        doc = json.loads(long_spec.read_text())
        doc["output"]["point_budget"] = 200_000
        long_spec.write_text(json.dumps(doc))
        short_spec = write_preview_job(tmp / "short", frames=16, segment_length=16, width=64, height=48)
        with Engine(tmp / "jobs", extra_args=("--device", "cpu", "--queue-size", "64")) as engine:
            client = engine.start()
            job = client.submit(long_spec)
            while client.status(job.id).frames_done < 160:
                time.sleep(0.05)
            headers = {"Authorization": f"Bearer {engine.token}"}
            status_url, health_url = f"{engine.url}/v1/jobs/{job.id}", f"{engine.url}/v1/health"
            status_file = engine.job_root / job.id / "status.json"

            def http_get(url):
                # One keep-alive connection per poller through the standard library's HTTP client: the lightest
                # client, so the CPU the pollers cost this 2-core machine is mostly the service's, not the bench's.
                parsed = urlsplit(url)

                def setup():
                    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)

                    def get():
                        connection.request("GET", parsed.path, headers=headers)
                        response = connection.getresponse()
                        body = response.read()
                        if response.status != 200:
                            raise RuntimeError(f"{url}: {response.status} {body[:200]!r}")
                    return get
                return setup

            def from_file():
                return lambda: json.loads(status_file.read_text())

            # Windows alternate, alone / polled / alone ..., and each polled window is compared with the mean of the
            # two alone windows around it, so a drift of the machine's speed does not read as the pollers' cost.
            figures = {}
            status_samples: list[float] = []
            alone = [frames_per_second(client, job.id, args.seconds)]
            polled = []
            for _ in range(args.rounds):
                polled.append(frames_per_second(client, job.id, args.seconds, lambda: status_samples.extend(
                    poll(http_get(status_url), args.pollers, args.seconds, args.interval))))
                alone.append(frames_per_second(client, job.id, args.seconds))
            ratios = [p / ((a + b) / 2) for p, a, b in zip(polled, alone, alone[1:])]
            fps_alone, fps_polled, fps_ratio = statistics.median(alone), statistics.median(polled), statistics.median(ratios)
            rate = len(status_samples) / (args.rounds * (args.seconds + 0.5))
            figures["status"] = (percentile(status_samples, 50) * 1000, percentile(status_samples, 99) * 1000, rate)
            print(f"   status: {len(status_samples):6d} requests by {args.pollers} pollers ({rate:6.0f}/s), "
                  f"p50 {figures['status'][0]:7.2f} ms, p99 {figures['status'][1]:7.2f} ms")
            print(f"job speed: alone {[round(f, 2) for f in alone]} frames/s, under the pollers {[round(f, 2) for f in polled]}: "
                  f"median ratio {fps_ratio:.3f}")
            for label, setup, interval in (("health", http_get(health_url), args.interval),
                                           ("file", from_file, args.interval),
                                           ("saturated", http_get(status_url), 0.0)):
                samples: list[float] = []
                fps = frames_per_second(client, job.id, args.seconds,
                                        lambda: samples.extend(poll(setup, args.pollers, args.seconds, interval)))
                p50, p99 = percentile(samples, 50) * 1000, percentile(samples, 99) * 1000
                rate = len(samples) / (args.seconds + 0.5)
                figures[label] = (p50, p99, rate)
                print(f"{label:>9}: {len(samples):6d} requests by {args.pollers} pollers ({rate:6.0f}/s), p50 {p50:7.2f} ms, "
                      f"p99 {p99:7.2f} ms; the job meanwhile {fps:5.2f} frames/s")
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
            print(f"submission to first progress (service): median {first_progress * 1000:.1f} ms of "
                  f"{[round(f * 1000, 1) for f in firsts]}")

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
                 saturated_per_s=figures["saturated"][2], saturated_p99_ms=figures["saturated"][1],
                 job_fps_alone=fps_alone, job_fps_polled=fps_polled, job_fps_ratio=fps_ratio,
                 direct_first_progress_s=statistics.median(direct), pollers=args.pollers, interval_s=args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
