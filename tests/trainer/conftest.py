"""What the trainer tests share: a run interrupted right after its first checkpoint."""

from __future__ import annotations

import pytest

from plait.trainer import loop


class Crash(Exception):
    """What the interrupted run dies of."""


@pytest.fixture
def interrupt_after_checkpoint(monkeypatch):
    """`interrupt_after_checkpoint(run, *args)` calls `run(*args)` with the training loop dying
    right after it writes its first checkpoint, and checks that it died there."""

    def interrupt(run, *args):
        real_save = loop.save_checkpoint

        def save_then_crash(*save_args, **save_kwargs):
            real_save(*save_args, **save_kwargs)
            raise Crash

        with monkeypatch.context() as patched:
            patched.setattr(loop, "save_checkpoint", save_then_crash)
            with pytest.raises(Crash):
                run(*args)

    return interrupt
