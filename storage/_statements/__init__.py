"""Every SQL statement leasehold runs, by name.

Domain code never builds SQL: it calls these builders (procrastinate keeps its queries in one
file the same way). Preconditions live in the WHERE clause; callers treat zero matched rows as an
error with a name. On MySQL the SQLAlchemy mysqlclient dialect connects with CLIENT_FOUND_ROWS, so
``rowcount`` counts *matched* rows, and an idempotent write that changes no column still reports 1
(proved against the real server by the contract tests).

The builders live in one module per topic, and every one is re-exported here, so that callers
name them ``statements.fence(...)`` whatever module holds them:

- ``lease``: the lease row (read, fence, lock, rotate, redeem, heartbeat, the batched heartbeat,
  reclaim scans) and the dispatches owed when the broker was down;
- ``effects``: the effect window of external calls, and the fence of an effect's record;
- ``owned``: owned writes, run inside a fence (the apply's state, its apply tasks' lifecycle, its
  log, comment and check records, the ending of its control requests);
- ``applies``: submission, and the reads of applies, their tasks, logs, comments and checks;
- ``control``: control requests;
- ``retry``: a failed apply back into its line;
- ``lines``: one apply per (database, environment) at a time;
- ``notifications``: completion for callers;
- ``publications``: what a pull request is still owed;
- ``marks``: when each background duty last ran;
- ``audit``: the read-only selects of ``leasehold audit``;
- ``_common``: what they share (the waiting states, the primary-key hint, ``Upsert``).

A builder that uses another calls it in its own module (or imports it from there), never through
this package: to replace one in a test, patch the module that holds it.
"""

from storage._statements._common import Upsert as Upsert
from storage._statements.applies import active_applies as active_applies
from storage._statements.applies import apply_by_request_id as apply_by_request_id
from storage._statements.applies import apply_row as apply_row
from storage._statements.applies import apply_task_rows as apply_task_rows
from storage._statements.applies import check_row as check_row
from storage._statements.applies import comment_row as comment_row
from storage._statements.applies import db_time as db_time
from storage._statements.applies import insert_apply as insert_apply
from storage._statements.applies import insert_apply_tasks as insert_apply_tasks
from storage._statements.applies import lease_table as lease_table
from storage._statements.applies import log_rows as log_rows
from storage._statements.audit import AUDIT_COMPLETION_EVENTS as AUDIT_COMPLETION_EVENTS
from storage._statements.audit import (
    audit_anonymous_control_requests as audit_anonymous_control_requests,
)
from storage._statements.audit import audit_applies as audit_applies
from storage._statements.audit import audit_checks as audit_checks
from storage._statements.audit import audit_comments as audit_comments
from storage._statements.audit import audit_logs as audit_logs
from storage._statements.audit import audit_one_apply as audit_one_apply
from storage._statements.audit import audit_tasks as audit_tasks
from storage._statements.control import control_request_row as control_request_row
from storage._statements.control import control_requests_of_apply as control_requests_of_apply
from storage._statements.control import insert_control_request as insert_control_request
from storage._statements.control import pending_control_requests as pending_control_requests
from storage._statements.control import pending_control_requests_of as pending_control_requests_of
from storage._statements.control import rotation_event as rotation_event
from storage._statements.effects import close_effect_window as close_effect_window
from storage._statements.effects import effect_fence as effect_fence
from storage._statements.effects import effect_window_row as effect_window_row
from storage._statements.effects import open_effect_window as open_effect_window
from storage._statements.lease import current_epoch as current_epoch
from storage._statements.lease import dispatch_sent as dispatch_sent
from storage._statements.lease import existing_apply_ids as existing_apply_ids
from storage._statements.lease import fence as fence
from storage._statements.lease import heartbeat as heartbeat
from storage._statements.lease import lock_apply as lock_apply
from storage._statements.lease import lock_held as lock_held
from storage._statements.lease import owe_dispatch as owe_dispatch
from storage._statements.lease import owed_dispatches as owed_dispatches
from storage._statements.lease import read_lease_row as read_lease_row
from storage._statements.lease import redeem as redeem
from storage._statements.lease import renew_held as renew_held
from storage._statements.lease import rotate as rotate
from storage._statements.lease import stale_candidates as stale_candidates
from storage._statements.lines import count_ahead as count_ahead
from storage._statements.lines import insert_line as insert_line
from storage._statements.lines import line_head as line_head
from storage._statements.lines import line_of as line_of
from storage._statements.lines import lock_line as lock_line
from storage._statements.lines import make_line as make_line
from storage._statements.lines import waiting_lines as waiting_lines
from storage._statements.marks import mark_row as mark_row
from storage._statements.marks import touch_mark as touch_mark
from storage._statements.notifications import claim_notification as claim_notification
from storage._statements.notifications import insert_notification as insert_notification
from storage._statements.notifications import notification_due as notification_due
from storage._statements.notifications import notification_message as notification_message
from storage._statements.notifications import notification_sent as notification_sent
from storage._statements.notifications import owed_notifications as owed_notifications
from storage._statements.notifications import release_notification as release_notification
from storage._statements.notifications import withdraw_notification as withdraw_notification
from storage._statements.owned import append_log as append_log
from storage._statements.owned import cancel_unfinished_tasks as cancel_unfinished_tasks
from storage._statements.owned import fail_pending_control_requests as fail_pending_control_requests
from storage._statements.owned import finish_control_request as finish_control_request
from storage._statements.owned import finish_task as finish_task
from storage._statements.owned import record_check as record_check
from storage._statements.owned import record_comment as record_comment
from storage._statements.owned import set_apply_state as set_apply_state
from storage._statements.owned import start_task as start_task
from storage._statements.owned import update_task as update_task
from storage._statements.publications import abandon_publication as abandon_publication
from storage._statements.publications import claim_publication as claim_publication
from storage._statements.publications import oldest_owed_publication as oldest_owed_publication
from storage._statements.publications import owed_publication_count as owed_publication_count
from storage._statements.publications import owed_publications as owed_publications
from storage._statements.publications import publication_due as publication_due
from storage._statements.publications import publication_lease as publication_lease
from storage._statements.publications import publication_row as publication_row
from storage._statements.publications import publication_settled as publication_settled
from storage._statements.publications import release_publication as release_publication
from storage._statements.retry import apply_failure as apply_failure
from storage._statements.retry import reopen_apply as reopen_apply
from storage._statements.retry import reopen_tasks as reopen_tasks
