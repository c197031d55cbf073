"""Pure policy decisions: what an agent may run, and at what cost.

Nothing here performs I/O or imports the server or the adapters: functions take the facts
they need and return a decision (see ../shared/DESIGN.md, "Pure decisions, effects at the edge").
"""
