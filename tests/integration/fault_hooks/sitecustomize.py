"""Fault injection for a ``streamvi run`` subprocess of the tests, loaded only when a test puts this
folder on its PYTHONPATH (tests/integration/faultkit.py, ``DaemonProcess(fault_hooks=...)``).

``FAULT_COMMIT_FAILS_AT=N``: the N-th exactly-once commit of this process fails as a broker would
fail it (the transaction is aborted, the committer reports the failure), so a test can make one
trainer worker fail the commit the others make.
"""

from __future__ import annotations

import os

_FAIL_AT = int(os.environ.get("FAULT_COMMIT_FAILS_AT", "0"))

if _FAIL_AT:
    from typing import Any

    from streamvi.stream.committers import ExactlyOnceCommitter

    _commit = ExactlyOnceCommitter.commit
    _calls = {"n": 0}

    def _failing_commit(self: ExactlyOnceCommitter, info: Any, offsets: Any) -> str | None:
        _calls["n"] += 1
        if _calls["n"] != _FAIL_AT:
            return _commit(self, info, offsets)
        self.sink.abort_transaction()
        reason = "the transaction failed to commit: injected by FAULT_COMMIT_FAILS_AT"
        self.discard(info, reason)
        return reason

    ExactlyOnceCommitter.commit = _failing_commit  # type: ignore[method-assign]
