"""The engine service: ``keyframe-worlds serve``, an HTTP API on loopback over a job queue.

- ``jobs``: the job folders on disk, the FIFO queue, and a supervising thread per worker.
- ``workers``: the server's side of a worker process (start, messages, end, how it died).
- ``worker``: the worker process itself: one per device, runs jobs, keeps the last model warm.
- ``devices``: which devices get a worker, decided without importing torch.
- ``app``: the FastAPI application (routes, token check, errors as JSON, body size limit).
- ``server``: binds the socket, prints ``READY port=N``, runs uvicorn, watches the parent process.
- ``openapi``: the OpenAPI document kept in the repository.
- ``commands``: the ``serve`` subcommand.

The HTTP side only validates, queues and reads status; the workers run the jobs.
The bridge's validator (``bridge/spec.py``) is the one source of the job spec rules,
``bridge/jobs.py`` the one source of the job states, status and progress protocol.
"""
