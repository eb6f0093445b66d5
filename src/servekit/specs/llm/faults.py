"""Simulated engine faults for the tests, switched on by env vars in the worker's environment: the
engine's step raises after N steps (a dead engine must have its worker replaced), or each step
takes longer (keeps requests running long enough to observe queueing, aborts and routing)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from servekit.llm.engine import LLMEngine
    from servekit.llm.outputs import RequestOutput

FAIL_AFTER_STEPS_ENV = "SERVEKIT_TEST_ENGINE_FAIL_AFTER_STEPS"
STEP_DELAY_ENV = "SERVEKIT_TEST_ENGINE_STEP_DELAY_S"


def install_fault_hooks(llm_engine: LLMEngine) -> None:
    fail_after = os.environ.get(FAIL_AFTER_STEPS_ENV)
    delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
    if not fail_after and not delay:
        return
    limit = int(fail_after) if fail_after else None
    step = llm_engine.step
    count = [0]

    def test_step(final_only: bool = False) -> list[RequestOutput]:
        count[0] += 1
        if limit is not None and count[0] > limit:
            raise RuntimeError(f"{FAIL_AFTER_STEPS_ENV}: simulated engine failure")
        if delay:
            time.sleep(delay)
        return step(final_only)

    llm_engine.step = test_step  # type: ignore[method-assign]
