"""Many devices: sharded parameters give the single-device updates, with a sensibly sharded state.

Runs tests/sharded_check.py in a subprocess with 8 simulated CPU devices
(``--xla_force_host_platform_device_count=8``), since the device count is fixed at JAX start.
"""

import os
import pathlib
import subprocess
import sys

import pytest


@pytest.mark.slow  # two minutes of 8-device compiles; the lowest-versions job runs it too
def test_sharded_updates_match_single_device():
    script = pathlib.Path(__file__).with_name("sharded_check.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count(" ok") >= 19
    assert "no mesh context, make_mesh explicit" in proc.stdout
