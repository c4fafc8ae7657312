"""CPU thread settings: what booth sets before torch starts, and what it leaves to the user."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from booth.threads import ThreadSettingError, configure_threads, thread_count, thread_settings


def test_without_settings_threads_sleep_and_stay_few():
    assert thread_settings({}, cpus=2) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2",
                                           "MKL_NUM_THREADS": "2"}
    assert thread_settings({}, cpus=64)["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize("environ", [{"OMP_NUM_THREADS": "3"}, {"MKL_NUM_THREADS": "3"}])
def test_a_users_thread_count_is_kept(environ):
    assert thread_settings(environ, cpus=8) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_booth_threads_wins_and_torch_means_hands_off():
    environ = {"BOOTH_THREADS": "6", "OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert thread_settings(environ, cpus=2) == {"OMP_NUM_THREADS": "6", "MKL_NUM_THREADS": "6"}
    assert thread_settings({"BOOTH_THREADS": " torch "}, cpus=2) == {}


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_booth_threads_is_a_clear_error_and_changes_nothing(value, monkeypatch):
    monkeypatch.setenv("BOOTH_THREADS", value)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    before = dict(os.environ)
    with pytest.raises(ThreadSettingError, match=f"BOOTH_THREADS must be a whole number.*{value}"):
        configure_threads()
    assert dict(os.environ) == before


def test_what_booth_set_is_kept_when_asked_again():
    first = thread_settings({}, cpus=2)
    assert thread_settings(first, cpus=2) == {}


def test_torch_in_a_fresh_process_uses_the_count_booth_set():
    """Set before torch is imported, the count and the wait policy hold; set after, the count
    still does. (torch never starts more threads than there are cores, so it asks for one.)"""
    code = ("import json, os\nfrom booth.threads import configure_threads, thread_count\n"
            "configure_threads()\nseen = [thread_count(), os.environ['OMP_WAIT_POLICY']]\n"
            "os.environ['BOOTH_THREADS'] = '2'\nconfigure_threads()\n"
            "print(json.dumps(seen + [thread_count()]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    done = subprocess.run([sys.executable, "-c", code], env=env | {"BOOTH_THREADS": "1"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [1, "PASSIVE", 2]


def test_the_test_process_itself_runs_at_the_count_conftest_chose():
    # Exact-resume tests compare this process with children it starts: one count for both.
    assert thread_count() == int(os.environ["OMP_NUM_THREADS"])
