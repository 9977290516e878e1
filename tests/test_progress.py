"""The shared progress log and time formatting."""

import math

import pytest

from reid_jax import progress


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00:00"), (59.6, "0:01:00"), (3599.4, "0:59:59"), (3600, "1:00:00"),
    (90000, "25:00:00"), (-1, "--"), (math.inf, "--"), (math.nan, "--"),
])
def test_format_seconds(seconds, text):
    assert progress.format_seconds(seconds) == text


def test_progress_log_rate_eta_and_throttling():
    now = [0.0]
    lines = []
    log = progress.ProgressLog("embed", unit="images", interval=10.0, clock=lambda: now[0],
                               log=lambda fmt, *args: lines.append(fmt % args))
    now[0] = 5.0
    log(50, 200)  # within the interval: nothing
    assert lines == []
    now[0] = 20.0
    log(100, 200)
    assert lines == ["embed: 100/200 images (50.0%), 5.0 images/s, ETA 0:00:20, "
                     "elapsed 0:00:20"]
    now[0] = 21.0
    log(200, 200)  # the end is always logged
    assert lines[-1].startswith("embed: 200/200 images (100.0%)") and "ETA 0:00:00" in lines[-1]
    with pytest.raises(ValueError, match="interval must be >= 0 seconds"):
        progress.ProgressLog("x", interval=-1)
