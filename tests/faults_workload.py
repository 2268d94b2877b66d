"""A fault-injection workload for tests/test_faults.py: the toy workload whose clients misbehave in round 1.

Partition ``RAISES`` raises, ``NAN`` trains on NaN inputs (its gradient is NaN), ``HANGS`` sleeps far past the
round timeout, ``DIES`` ends its process with ``os._exit`` (in a Ray actor: the actor dies). Every other
client-round, and every client in later rounds, is the plain toy workload.

Ray worker processes do not see a test's monkeypatched plugin table: :func:`register` is run in each worker by
Ray's ``worker_process_setup_hook`` (see the test) and in the test process by a fixture.
"""

from __future__ import annotations

import os
import time

import torch

from toy import ToyWorkload

RAISES, NAN, HANGS, DIES = 1, 2, 3, 4
FAULT_ROUND = 1
HANG_SECONDS = 300.0


def register() -> None:
    import fedaqt.plugins as plugins

    plugins._BUILTIN_WORKLOADS["faults"] = "faults_workload:FaultWorkload"


class FaultWorkload(ToyWorkload):
    name = "faults"
    description = "toy workload with injected client faults in round 1"

    def client_batches(self, client_id, round_num, num_batches, batch_size):
        batches = super().client_batches(client_id, round_num, num_batches, batch_size)
        if round_num != FAULT_ROUND:
            return batches
        if client_id == RAISES:
            raise RuntimeError("injected fault: this client raises")
        if client_id == HANGS:
            time.sleep(HANG_SECONDS)
        if client_id == DIES:
            os._exit(17)
        if client_id == NAN:
            return [(torch.full_like(x, float("nan")), y) for x, y in batches]
        return batches
