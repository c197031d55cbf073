"""The shipped policy files: the example documents every key, and both it and the default are valid."""

from __future__ import annotations

from pathlib import Path

from qpu_gateway.policy.file import (
    AdaptiveAdmission,
    Notifications,
    Quota,
    Rules,
    Webhook,
    default_policy_text,
    parse_policy,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_example_policy_is_valid_and_names_every_key() -> None:
    text = (REPO / "policy.example.toml").read_text(encoding="utf-8")
    policy = parse_policy(text, path="policy.example.toml")
    for key in [
        *Rules.model_fields,
        *Quota.model_fields,
        *AdaptiveAdmission.model_fields,
        *Notifications.model_fields,
        *Webhook.model_fields,
    ]:
        assert key in text, f"policy.example.toml does not mention {key}"
    research = policy.rules_for(agent="someone", project="research")
    assert research.priority_ceiling == "high" and research.allowed_backends == ("aer/*", "ibm/*")
    bot = policy.rules_for(agent="ci-bot", project="default")
    assert bot.allowed_backends == ("aer/*",) and bot.agent_quota.running_jobs == 2
    assert bot.agent_quota.queued_jobs == 200  # merged from [defaults]: tables merge key by key
    assert policy.adaptive_admission == AdaptiveAdmission()  # the example spells out the defaults
    assert [hook.name for hook in policy.notifications.hooks_for("approval_needed")] == ["ops-slack"]


def test_the_default_policy_is_safe_out_of_the_box() -> None:
    rules = parse_policy(default_policy_text()).rules_for(agent="any", project="default")
    assert any(r.per == "agent" and "submit_job" in r.tools for r in rules.rate_limits)
    assert rules.agent_quota.cost_usd.day is not None
    assert rules.micro("confirm_above_usd") == 5_000_000
    assert "aer/*" in rules.allowed_backends
