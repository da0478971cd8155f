"""Preemption signals are held back while a checkpoint is written, then handled."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap

import torch

from cil_dist.training import signals
from cil_dist.training.checkpoint import load_checkpoint, save_checkpoint


def test_a_signal_inside_the_block_reaches_its_handler_after_it():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, _: calls.append(signum))
    try:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGUSR2)
            assert calls == []
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


class _SignalWhilePickled:
    """Sends SIGUSR2 to this process when ``torch.save`` reaches it: mid-write, every time."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGUSR2)
        return (collections.OrderedDict, ())  # a global that weights_only loading accepts


def test_a_preemption_mid_save_leaves_a_complete_checkpoint_then_exits(tmp_path):
    def exit_like_submitit(signum, frame):
        raise SystemExit(-1)  # what submitit's handler does after requeueing

    previous = signal.signal(signal.SIGUSR2, exit_like_submitit)
    path = tmp_path / "epoch_0001.pt"
    try:
        exited = False
        try:
            save_checkpoint(path, weights=torch.arange(1 << 20), marker=_SignalWhilePickled())
        except SystemExit:
            exited = True
        assert exited
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert torch.equal(load_checkpoint(path)["weights"], torch.arange(1 << 20))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_default_terminate_still_terminates_after_the_block():
    script = textwrap.dedent(
        """
        import os, signal
        from cil_dist.training import signals

        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            print("block finished", flush=True)
        print("not reached", flush=True)
        """
    )
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert done.stdout.splitlines() == ["block finished"]
