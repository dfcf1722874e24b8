"""The buffered sender: a run's metrics and images go to MLflow from a background thread.

The training step never waits for the server, and a server that goes away costs no metric and
never the run: what the sender cannot hold, or still holds when the run ends, goes to the run's
storage (`spill.py`) and is delivered later. Only what storage refuses too is dropped, counted and
named in a warning.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from dcgan_dist.tracking.spill import Spill, describe, log_image_once
from dcgan_dist.util import first_line, redact

log = logging.getLogger(__name__)

CLOSE_ATTEMPTS = 3  # sends that may fail after close() before the rest is given up


class BufferedSender:
    """Sends a run's metrics and images from a background thread.

    `add_metrics`, `add_tags` and `add_image` only append to a buffer, so the training step never waits for
    the server. A failed send is retried with backoff (1 s doubling to `retry_max_s`) while the
    data waits in the buffer. Past `max_metrics` (or `max_images`) the oldest go to `spill` (the
    run's storage; written by this thread between retries), and what is unsent when the run ends
    too. Without a spill, or when it cannot be written, they are dropped and counted; when the
    server answers again the counts are logged as the metrics `tracking/dropped_metrics` and
    `tracking/dropped_images` (running totals) and a warning.
    """

    def __init__(self, client: MlflowClient, run_id: str, max_metrics: int = 200_000, max_images: int = 16,
                 retry_max_s: float = 30.0, spill: Spill | None = None):
        self.client, self.run_id, self.spill = client, run_id, spill
        self.max_metrics, self.max_images, self.retry_max_s = max_metrics, max_images, retry_max_s
        self.dropped_metrics = self.dropped_images = 0
        self._reported = (0, 0)  # the dropped counts the run already shows
        self._metrics: collections.deque[Metric] = collections.deque()
        self._tags: dict[str, str] = {}  # the newest value of each tag not yet sent
        self._images: collections.deque[tuple[np.ndarray, str, int, int]] = collections.deque()  # (image, key, step, ms)
        self._overflow: tuple[list[Metric], list[tuple]] = ([], [])  # pushed out of a full buffer, to be spilled
        self._last_step = 0
        self._in_flight = 0  # taken out of the buffer, being sent
        self._sending: tuple[list[Metric], dict[str, str], list[tuple]] = ([], {}, [])  # what is in flight
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    def add_metrics(self, metrics: list[Metric]) -> None:
        with self._changed:
            self._metrics.extend(metrics)
            self._last_step = max([self._last_step] + [m.step for m in metrics])
            self._drop_overflow()
            self._changed.notify()

    def add_tags(self, tags: dict[str, str]) -> None:
        with self._changed:
            self._tags.update(tags)
            self._changed.notify()

    def add_image(self, image_hwc: np.ndarray, key: str, step: int) -> None:
        with self._changed:
            self._images.append((image_hwc, key, step, mlflow.utils.time.get_current_time_millis()))
            self._drop_overflow()
            self._changed.notify()

    def pending(self) -> int:
        """Metrics and images not yet sent."""
        with self._changed:
            return len(self._metrics) + len(self._tags) + len(self._images) + self._in_flight

    def close(self, timeout_s: float = 300.0) -> None:
        """Send what is left, for at most timeout_s; what could not be sent is spilled (or counted
        and named in a warning)."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(timeout_s)
        with self._changed:
            metrics, images = list(self._metrics) + self._overflow[0], list(self._images) + self._overflow[1]
            tags = dict(self._tags)
            if self._thread.is_alive():  # still sending: spill that too (a metric delivered twice is kept once)
                metrics, tags, images = self._sending[0] + metrics, self._sending[1] | tags, self._sending[2] + images
            self._metrics.clear()
            self._images.clear()
            self._tags.clear()
            self._overflow = ([], [])
        if metrics or images or tags:
            self._keep(metrics, tags, images, "the run ended with them unsent")

    def _keep(self, metrics: list[Metric], tags: dict[str, str], images: list[tuple], why: str) -> None:
        """Spill what the server did not take; what storage refuses too is counted as dropped."""
        what = describe(metrics, tags, images)
        if self.spill is not None:
            try:
                folder = self.spill.write(self.run_id, metrics, tags, images)
            except Exception as e:  # noqa: BLE001 - storage is away too: say what is lost
                log.warning("MLflow server %s away (%s) and the spill to %s failed (%s): lost %s", redact(self.client.tracking_uri),
                            why, redact(self.spill.where(self.run_id)), first_line(e), what)
            else:
                log.warning("MLflow server %s away (%s): kept %s in %s; `python -m dcgan_dist.register` (or re-running the "
                            "training command) delivers them", redact(self.client.tracking_uri), why, what, redact(folder))
                return
        else:
            log.warning("MLflow server %s away (%s): dropped %s", redact(self.client.tracking_uri), why, what)
        with self._changed:
            self.dropped_metrics += len(metrics)
            self.dropped_images += len(images)

    def _drop_overflow(self) -> None:  # caller holds the lock
        for queue, limit, kind in ((self._metrics, self.max_metrics, "metrics"), (self._images, self.max_images, "images")):
            overflow = len(queue) - limit
            if overflow <= 0:
                continue
            pushed_out = [queue.popleft() for _ in range(overflow)]
            if self.spill is not None:  # the send loop writes them to storage
                self._overflow[kind == "images"].extend(pushed_out)
                continue
            total = self.dropped_metrics if kind == "metrics" else self.dropped_images
            if total == 0:
                log.warning("MLflow buffer full: dropping the oldest %s while the server is away (counted in "
                            "tracking/dropped_%s)", kind, kind)
            if kind == "metrics":
                self.dropped_metrics += overflow
            else:
                self.dropped_images += overflow

    def _send_loop(self) -> None:
        backoff, failing, failures_closing = 1.0, False, 0
        while True:
            with self._changed:
                while not (self._metrics or self._tags or self._images or self._closing):
                    self._changed.wait()
                if not (self._metrics or self._tags or self._images):
                    return  # closing, and everything was sent
                # Taken out while sending; put back in front if the send fails (log_batch takes 1000 entries, 100 of them tags).
                tags = dict(itertools.islice(self._tags.items(), 100))
                for key in tags:
                    del self._tags[key]
                batch = [self._metrics.popleft() for _ in range(min(1000 - len(tags), len(self._metrics)))]
                image = self._images.popleft() if self._images and not (batch or tags) else None
                self._in_flight = len(batch) + len(tags) + (image is not None)
                self._sending = (batch, tags, [image] if image is not None else [])
            sent = False
            try:
                if batch or tags:
                    self.client.log_batch(self.run_id, metrics=batch, tags=[RunTag(key, value) for key, value in tags.items()])
                else:
                    log_image_once(self.client, self.run_id, *image)  # a retry may follow a send cut half-way
                sent = True
                self._report_drops()
            except Exception as e:  # the server is away or failing: keep the data, retry later
                with self._changed:
                    self._in_flight, self._sending = 0, ([], {}, [])
                    if not sent:
                        self._metrics.extendleft(reversed(batch))
                        self._tags = tags | self._tags  # a value set meanwhile is newer
                        if image is not None:
                            self._images.appendleft(image)
                        self._drop_overflow()
                    overflow, self._overflow = self._overflow, ([], [])
                if overflow[0] or overflow[1]:
                    self._keep(overflow[0], {}, overflow[1], "its buffer overflowed")
                if not failing:
                    log.warning("MLflow server %s is not answering (%s); buffering metrics and retrying",
                                redact(self.client.tracking_uri), first_line(e))
                failing = True
                with self._changed:
                    failures_closing += self._closing
                    if failures_closing >= CLOSE_ATTEMPTS:
                        return  # the run is over and the server is still away: close() counts what is left
                    self._changed.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            with self._changed:
                self._in_flight, self._sending = 0, ([], {}, [])
            if failing:
                log.warning("MLflow server %s answers again; sending the buffered metrics", redact(self.client.tracking_uri))
            backoff, failing = 1.0, False

    def dropped(self) -> tuple[int, int]:
        """(metrics, images) dropped so far: read under the lock the adders count them under."""
        with self._changed:
            return self.dropped_metrics, self.dropped_images

    def _report_drops(self) -> None:
        with self._changed:
            counts, last_step = (self.dropped_metrics, self.dropped_images), self._last_step
        if counts == self._reported:
            return
        timestamp = mlflow.utils.time.get_current_time_millis()
        self.client.log_batch(self.run_id, metrics=[
            Metric("tracking/dropped_metrics", counts[0], timestamp, last_step),
            Metric("tracking/dropped_images", counts[1], timestamp, last_step),
        ])
        log.warning("MLflow server %s: %d metrics and %d images were dropped while it was away",
                    redact(self.client.tracking_uri), *counts)
        self._reported = counts
