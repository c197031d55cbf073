"""The operator console: approvals, jobs, spend, agents, backends, audit and policy in a browser."""
