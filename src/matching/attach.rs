//! SessionId and MasterId attaches: an event addressed to a call or a call group is matched to
//! it once it exists, whatever the rules say.

use std::collections::HashMap;

use crate::decision::{Decision, MASTER_RULE, Reason, SESSION_RULE, TargetKind};

/// Attaches events by SessionId given the calls found for their session ids
/// (`session_id -> call id`); an event whose session has no call yet stays `unknown_session`.
pub fn attach_by_session<'a>(
    session_ids: impl IntoIterator<Item = &'a str>,
    calls: &HashMap<String, String>,
) -> Vec<Decision> {
    session_ids
        .into_iter()
        .map(|s| match calls.get(s) {
            Some(call) => {
                Decision::Matched { rule: SESSION_RULE.to_owned(), kind: TargetKind::Call, target: call.clone() }
            }
            None => Decision::Unmatched { reason: Reason::UnknownSession, candidates: Vec::new() },
        })
        .collect()
}

/// Attaches events by MasterId given which of their groups exist; an event whose group does not
/// exist yet stays `unknown_group`.
pub fn attach_by_group<'a>(
    master_ids: impl IntoIterator<Item = &'a str>,
    groups: &std::collections::HashSet<String>,
) -> Vec<Decision> {
    master_ids
        .into_iter()
        .map(|g| {
            if groups.contains(g) {
                Decision::Matched { rule: MASTER_RULE.to_owned(), kind: TargetKind::CallGroup, target: g.to_owned() }
            } else {
                Decision::Unmatched { reason: Reason::UnknownGroup, candidates: Vec::new() }
            }
        })
        .collect()
}
