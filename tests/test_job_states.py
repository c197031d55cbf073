"""The job state machine: one table of allowed moves, checked in one place."""

from __future__ import annotations

import itertools

import pytest

from qpu_gateway.jobs.states import TERMINAL, TRANSITIONS, IllegalTransition, JobState, check_transition, sources_of

ALL_STATES = list(JobState)


def test_every_state_has_a_row_in_the_table() -> None:
    assert set(TRANSITIONS) == set(JobState)


def test_terminal_states_are_exactly_the_states_with_no_way_out() -> None:
    assert {state for state, targets in TRANSITIONS.items() if not targets} == TERMINAL


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
@pytest.mark.parametrize("target", ALL_STATES)
def test_no_move_leaves_a_terminal_state(terminal: JobState, target: JobState) -> None:
    with pytest.raises(IllegalTransition, match=f"{terminal} -> {target} is not allowed"):
        check_transition(terminal, target)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (JobState.SUCCEEDED, JobState.RUNNING),
        (JobState.QUEUED, JobState.SUCCEEDED),
        (JobState.QUEUED, JobState.RUNNING),
        (JobState.QUEUED, JobState.QUEUED),
        (JobState.PENDING_APPROVAL, JobState.SUCCEEDED),
        (JobState.PENDING_APPROVAL, JobState.SUBMITTING),
        (JobState.RUNNING, JobState.PENDING_APPROVAL),
        (JobState.CANCELLED, JobState.QUEUED),
    ],
)
def test_moves_the_table_forbids_raise_illegal_transition(old: JobState, new: JobState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"), [(old, new) for old, targets in TRANSITIONS.items() for new in sorted(targets)]
)
def test_every_move_in_the_table_is_allowed(old: JobState, new: JobState) -> None:
    check_transition(old, new)


def test_the_happy_path_from_queue_to_counts_is_allowed_step_by_step() -> None:
    path = [JobState.QUEUED, JobState.SUBMITTING, JobState.RUNNING, JobState.SUCCEEDED]

    for old, new in itertools.pairwise(path):
        check_transition(old, new)


def test_a_worker_may_hand_a_job_back_to_the_queue_from_submitting_or_running() -> None:
    assert sources_of(JobState.QUEUED) == {JobState.PENDING_APPROVAL, JobState.SUBMITTING, JobState.RUNNING}


@pytest.mark.parametrize("new", ALL_STATES)
def test_sources_of_lists_exactly_the_states_that_may_move_to_a_state(new: JobState) -> None:
    sources = sources_of(new)

    assert sources == {old for old in JobState if new in TRANSITIONS[old]}
    for old in JobState:
        if old in sources:
            check_transition(old, new)
        else:
            with pytest.raises(IllegalTransition):
                check_transition(old, new)


def test_no_state_moves_into_pending_approval_and_no_terminal_state_is_a_source() -> None:
    assert sources_of(JobState.PENDING_APPROVAL) == frozenset()
    assert all(not (sources_of(new) & TERMINAL) for new in JobState)


def test_every_live_state_can_still_reach_an_end() -> None:
    for start in set(JobState) - TERMINAL:
        seen, frontier = {start}, [start]
        while frontier:
            for target in TRANSITIONS[frontier.pop()]:
                if target not in seen:
                    seen.add(target)
                    frontier.append(target)
        assert seen & TERMINAL, f"{start} can never finish"


def test_states_are_stored_as_their_lowercase_names() -> None:
    assert [state.value for state in JobState] == [state.name.lower() for state in JobState]
    assert JobState("running") is JobState.RUNNING
