"""The policy files the measures run under, each derived from the shipped default.

They are built by editing the text of `policy/default_policy.toml` (not written from scratch), so
every other rule of the default (caps, budget, approvals, loop guard, priorities) stays in force
and its cost stays in the measured path. An edit whose text is no longer in the default fails
loudly instead of silently measuring something else.
"""

from __future__ import annotations

from qpu_gateway.policy.file import default_policy_text

_SUBMIT_RULE = '{ limit = "60/minute", per = "agent", tools = ["submit_job"] }'
_ALL_TOOLS_RULE = '{ limit = "20/second", per = "agent", tools = ["*"] }'

# Why raised, and why per second: the default allows 60 submits a minute and 20 calls a second
# per agent, which a benchmark loop exceeds within a second. The rules stay (so every call still
# pays for its rate-limit check), with a limit no measure reaches. The window stays one second:
# the moving-window storage keeps one row per hit in the window and sums them on every check, so
# a per-minute or per-hour window with a huge limit would make each check scan far more rows
# than the default ever does, and measure an artefact of the benchmark instead of the gateway.
_RAISED_SUBMIT_RULE = '{ limit = "5000/second", per = "agent", tools = ["submit_job"] }'
_RAISED_ALL_TOOLS_RULE = '{ limit = "5000/second", per = "agent", tools = ["*"] }'

# A refused call: the first submit_job in the hour is admitted and every later one is refused
# with `rate_limited`, before any parsing or pricing, which is the path a looping agent takes.
_REFUSING_SUBMIT_RULE = '{ limit = "1/hour", per = "agent", tools = ["submit_job"] }'


def _edit(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"the default policy no longer reads {old!r}; update bench/policies.py")
    return text.replace(old, new)


def admitting() -> str:
    """The default policy with its rate limits out of a benchmark's way."""
    text = _edit(default_policy_text(), _SUBMIT_RULE, _RAISED_SUBMIT_RULE)
    return _edit(text, _ALL_TOOLS_RULE, _RAISED_ALL_TOOLS_RULE)


def refusing() -> str:
    """The default policy with a submit_job limit that refuses every call after the first."""
    text = _edit(default_policy_text(), _SUBMIT_RULE, _REFUSING_SUBMIT_RULE)
    return _edit(text, _ALL_TOOLS_RULE, _RAISED_ALL_TOOLS_RULE)


_LOOP_GUARD = "loop_guard = { max_repeats = 50, window_minutes = 10 }"
_RAISED_LOOP_GUARD = "loop_guard = { max_repeats = 1000000, window_minutes = 10 }"
_BACKENDS = 'allowed_backends = ["aer/*", "ibm/*", "braket/*", "azure/*"]'
_WITH_FAULTY = 'allowed_backends = ["aer/*", "ibm/*", "braket/*", "azure/*", "faulty/*"]'


def counting() -> str:
    """`admitting()` for the statement counter: the same Bell pair again and again (the loop guard
    raised, its check still made), and the fault-injecting adapter's `faulty/qpu` allowed, free."""
    text = _edit(admitting(), _LOOP_GUARD, _RAISED_LOOP_GUARD)
    text = _edit(text, _BACKENDS, _WITH_FAULTY)
    return text + '\n[prices."faulty/*"]\nmodel = "free"\n'
