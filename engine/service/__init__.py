"""The engine service: ``keyframe-worlds serve``, an HTTP API on loopback over a job queue.

- ``jobs``: the job folders on disk, the FIFO queue and one worker thread per device.
- ``app``: the FastAPI application (routes, token check, errors as JSON, body size limit).
- ``server``: binds the socket, prints ``READY port=N``, runs uvicorn, watches the parent process.
- ``commands``: the ``serve`` subcommand.

The HTTP side only enqueues jobs and reads their state; the workers run them.
The bridge's validator (``bridge/spec.py``) is the one source of the job spec rules.
"""
