"""Uvicorn's h11 protocol with read timeouts and a connection cap that drops idle sockets first.

Why this and not uvicorn's settings alone: ``timeout_keep_alive`` only runs after
a response, so a connection that never sends a request, or stops halfway through
its headers (``h11_max_incomplete_event_size`` bounds their size, not their
time), is held forever; and ``limit_concurrency`` counts those held connections,
so a few hundred stalled sockets turn every request, health included, into a 503.
Here:

* the request headers must arrive within ``header_timeout_s`` of the connection
  opening (or of the first byte of the next request on a kept-alive one), else
  the connection is closed; trickling bytes does not extend it;
* a request body may pause for at most ``body_idle_s`` (while the app waits for
  it; not while the server itself has paused reading);
* beyond ``max_connections`` open connections, each new one closes the
  connection that has waited longest without a request in flight: stalled and
  idle sockets go first, so a flood of them cannot starve a client that sends a
  whole request, and requests in flight are never cut by it.

``limit_concurrency`` stays above ``max_connections`` as the bound on requests
being served at once.
"""

from __future__ import annotations

import asyncio
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
BODY_IDLE_S = 30.0
MAX_CONNECTIONS = 256


def guarded_protocol(header_timeout_s: float = HEADER_TIMEOUT_S, body_idle_s: float = BODY_IDLE_S,
                     max_connections: int = MAX_CONNECTIONS) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "body_idle_s": body_idle_s, "max_connections": max_connections})


class GuardedH11Protocol(H11Protocol):
    header_timeout_s = HEADER_TIMEOUT_S
    body_idle_s = BODY_IDLE_S
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._tracked_cycle = None
        self._idle_since = time.monotonic()
        super().connection_made(transport)
        self._arm_header_timer()
        if len(self.connections) > self.max_connections:
            self._evict_idle()

    def connection_lost(self, exc) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._request_in_flight() and self._header_timer is None:
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and cycle is not self._tracked_cycle:
            self._tracked_cycle = cycle  # a new request's headers are complete
            self._cancel(self._header_timer)
            self._header_timer = None
        if self._request_in_flight() and cycle.more_body and not cycle.disconnected:
            self._cancel(self._body_timer)
            self._body_timer = self.loop.call_later(self.body_idle_s, self._body_timed_out)
        else:
            self._cancel(self._body_timer)
            self._body_timer = None

    def on_response_complete(self) -> None:
        self._idle_since = time.monotonic()
        self._cancel(self._body_timer)
        self._body_timer = None
        super().on_response_complete()

    # --- the guards --------------------------------------------------------------------

    def _request_in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._cancel(self._header_timer)
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self._request_in_flight():
            self._close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if not self._request_in_flight() or not self.cycle.more_body:
            return
        if self.flow.read_paused:  # the server is not reading (the app is behind), not the client stalling
            self._body_timer = self.loop.call_later(self.body_idle_s, self._body_timed_out)
            return
        self.logger.warning("closing a connection whose request body stalled for %.0f s", self.body_idle_s)
        self._close()

    def _evict_idle(self) -> None:
        """Close the connection that has waited longest with no request in flight (never one being served)."""
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and not c._request_in_flight()
                and not c.transport.is_closing()]
        if idle:
            min(idle, key=lambda c: c._idle_since)._close()

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _cancel_timers(self) -> None:
        self._cancel(self._header_timer)
        self._cancel(self._body_timer)
        self._header_timer = self._body_timer = None

    @staticmethod
    def _cancel(timer) -> None:
        if timer is not None:
            timer.cancel()
