"""Can a scorer replica answer? The ingress's view of it, with no probe per request while all is well.

While a deployment has no running replica (the only one died and its replacement is still starting), Ray Serve
queues a request until the replacement is up, which can take a minute. ``ScorerGate`` answers such requests with a
retryable error at once instead (the ingress turns it into a 503 with ``Retry-After``):

* after a call fails because its replica died (``RayActorError``, ``ReplicaUnavailableError``,
  ``DeploymentUnavailableError``) the gate is *down*: each request probes first and is refused until a probe finds
  a ready replica;
* a call still waiting after ``check_s`` (it may sit in Serve's queue for a replica that is gone, e.g. one that died
  while idle) probes; if no replica is running, the call is cancelled and refused;
* a ``BackPressureError`` (``max_queued_requests`` reached) is ``overloaded``, unless the probe finds no replica
  running (requests pile up while none is): then it is ``unavailable``.

The probe is ``handle.broadcast("ready")``: Serve's router raises ``DeploymentUnavailableError`` at once when it knows
of no running replica, and otherwise asks every running replica (bounded by ``timeout_s``). A ready answer is
remembered for ``check_s``, so slow requests share one probe per interval; ``/health`` always probes afresh.
"""

from __future__ import annotations

import asyncio
import enum
import time

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

# the replica died (RayActorError, ActorUnavailableError), is gone or restarting: the gate goes down
REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class Readiness(enum.Enum):
    READY = "ready"      # a running replica answered ready
    DOWN = "down"        # no replica is running: it died or is restarting
    UNKNOWN = "unknown"  # replicas run but none answered ready in time


class ScorerUnavailable(Exception):
    """A retryable failure: ``kind`` is ``unavailable`` (no replica can answer) or ``overloaded`` (queue full)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class ScorerGate:
    """Calls the scorer through a Serve handle, refusing at once while no replica can answer."""

    def __init__(self, handle, *, check_s: float, timeout_s: float):
        self.handle, self.check_s, self.timeout_s = handle, check_s, timeout_s
        self.down = False
        self._ready_at = float("-inf")

    async def probe(self) -> tuple[Readiness, str]:
        """Ask every running replica whether it is ready; (readiness, why not)."""
        try:
            answers = await self.handle.broadcast("ready").results_async(timeout_s=self.timeout_s,
                                                                         return_exceptions=True)
        except DeploymentUnavailableError:
            return self._seen(Readiness.DOWN, "no scorer replica is running (it died or is restarting)")
        except TimeoutError:
            return self._seen(Readiness.UNKNOWN, f"no scorer replica answered within {self.timeout_s:g} s")
        if any(a is True for a in answers):
            return self._seen(Readiness.READY, "")
        kinds = ", ".join(sorted({type(a).__name__ for a in answers}))
        if answers and all(isinstance(a, REPLICA_GONE) for a in answers):
            return self._seen(Readiness.DOWN, f"the scorer replicas died ({kinds})")
        return self._seen(Readiness.UNKNOWN, f"no scorer replica is ready ({kinds or 'none answered'})")

    def _seen(self, state: Readiness, why: str) -> tuple[Readiness, str]:
        if state is Readiness.READY:
            self.down, self._ready_at = False, time.monotonic()
        elif state is Readiness.DOWN:
            self._mark_down()
        return state, why

    def _mark_down(self) -> None:
        self.down, self._ready_at = True, float("-inf")  # a ready answer from before the death no longer stands

    async def _recent_probe(self) -> tuple[Readiness, str]:
        """A ready answer younger than ``check_s`` stands; anything else probes again."""
        if time.monotonic() - self._ready_at < self.check_s:
            return Readiness.READY, ""
        return await self.probe()

    async def call(self, method: str, *args):
        """``handle.<method>.remote(*args)``'s result, or ``ScorerUnavailable``."""
        if self.down:
            state, why = await self.probe()
            if state is not Readiness.READY:
                raise ScorerUnavailable("unavailable", why)
        try:
            return await self._wait(getattr(self.handle, method).remote(*args))
        except BackPressureError:
            state, why = await self._recent_probe()
            if state is Readiness.DOWN:
                raise ScorerUnavailable("unavailable", why) from None
            raise ScorerUnavailable("overloaded", "too many requests are waiting for the scorer "
                                    "(max_queued_requests)") from None
        except REPLICA_GONE as exc:
            self._mark_down()
            raise ScorerUnavailable("unavailable", f"the scorer replica is unavailable ({type(exc).__name__}: it "
                                    "died or is restarting)") from None

    async def _wait(self, response):
        """Await a handle response; every ``check_s`` it is still pending, check that a replica is running."""
        task = asyncio.ensure_future(response)
        task.add_done_callback(_retrieve)  # a call cancelled below ends in RequestCancelledError: nobody awaits it
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.check_s)
                if done:
                    return task.result()
                state, why = await self._recent_probe()
                if state is Readiness.DOWN:
                    response.cancel()
                    raise ScorerUnavailable("unavailable", why)
        finally:
            if not task.done():
                task.cancel()


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
