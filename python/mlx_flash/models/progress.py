"""Progress of a model's download and load as log lines: `downloading model` / `loading model` with
`percent`, `bytes` and `total_bytes`, one per 10%. The sidecar draws these lines as progress bars when
its output is a terminal and writes them as they are otherwise."""

from __future__ import annotations

import logging
import os
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

STEP_PERCENT = 10


class ProgressLog:
    """Reports `done` of `total` bytes for `model` once per step of 10%, below 100%: the line that says
    it is done (`model loaded`, `model downloaded`) is the caller's."""

    def __init__(self, model: str, msg: str) -> None:
        self.model = model
        self.msg = msg
        self._reported = -1

    def update(self, done: int, total: int) -> None:
        if total <= 0:
            return
        percent = done * 100 // total
        if percent >= 100 or percent // STEP_PERCENT <= self._reported // STEP_PERCENT:
            return
        self._reported = percent
        fields = {"model": self.model, "percent": percent, "bytes": done, "total_bytes": total}
        log.info(self.msg, extra=fields)


def download_progress(model: str) -> type[Any]:
    """A tqdm class for `snapshot_download(tqdm_class=...)`: its byte bars report to the log, never to
    the terminal (a worker's stderr is the sidecar's pipe). The hub sums every file's bytes written
    into one bar whose total grows as downloads start; that one is reported."""
    report = ProgressLog(model, "downloading model")

    class DownloadProgress(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed with the bar
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> None:
            if self.unit == "B" and str(self.desc).startswith("Reconstruct"):
                report.update(int(self.n), int(self.total or 0))

        def close(self) -> None:
            super().close()
            self.fp.close()

    return DownloadProgress
