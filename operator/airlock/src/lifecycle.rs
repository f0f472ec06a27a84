//! The life of an output request, as a pure state machine: who may do what in which state.
//!
//! ```text
//! submitted ──content verified, checks run──▶ checked ──first approval──▶ inReview
//!     checked | inReview ──enough distinct approvals──▶ approved ──requester downloads──▶ released
//!     checked | inReview ──one rejection (reason)────▶ rejected
//!     submitted | checked ──the checks refuse it (archive, executable)──▶ rejected
//!     checked | inReview ──changes requested (reason)▶ changesRequested
//!     submitted | checked | inReview | approved ──requester withdraws──▶ withdrawn
//!     submitted | checked | inReview | approved ──retention passes─────▶ expired
//! ```
//! Decisions are final: `approved` only moves on to `released` (or `withdrawn`/`expired`), and
//! `rejected`, `changesRequested`, `released`, `withdrawn`, `expired` never change. The
//! requester never reviews their own request; each checker reviews a request once.

use serde::{Deserialize, Serialize};

/// Where a request is. The serialised names are the API's and the database's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum State {
    /// The manifest arrived; the content has not (or not verified).
    Submitted,
    /// Content verified and the automatic checks ran; waiting for reviewers.
    Checked,
    /// At least one approval, not yet enough.
    InReview,
    Approved,
    Rejected,
    ChangesRequested,
    /// The requester downloaded the file (once).
    Released,
    Withdrawn,
    Expired,
}

impl State {
    pub const ALL: [State; 9] = [
        State::Submitted,
        State::Checked,
        State::InReview,
        State::Approved,
        State::Rejected,
        State::ChangesRequested,
        State::Released,
        State::Withdrawn,
        State::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Submitted => "submitted",
            State::Checked => "checked",
            State::InReview => "inReview",
            State::Approved => "approved",
            State::Rejected => "rejected",
            State::ChangesRequested => "changesRequested",
            State::Released => "released",
            State::Withdrawn => "withdrawn",
            State::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No event changes this state any more.
    pub fn is_final(self) -> bool {
        matches!(self, State::Rejected | State::ChangesRequested | State::Released | State::Withdrawn | State::Expired)
    }

    /// Reviewers may still decide.
    pub fn open_for_review(self) -> bool {
        matches!(self, State::Checked | State::InReview)
    }

    /// The stored content may be deleted once retention has passed since the request got here.
    pub fn content_disposable(self) -> bool {
        self.is_final()
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reviewer's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Decision {
    Approve,
    Reject,
    RequestChanges,
}

impl Decision {
    pub const ALL: [Decision; 3] = [Decision::Approve, Decision::Reject, Decision::RequestChanges];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
            Decision::RequestChanges => "requestChanges",
        }
    }

    pub fn parse(s: &str) -> Option<Decision> {
        Decision::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// A rejection or a request for changes must say why.
    pub fn needs_reason(self) -> bool {
        !matches!(self, Decision::Approve)
    }
}

/// Who acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor<'a> {
    /// The control plane itself (content verification, expiry).
    System,
    /// A person; `checker` says whether they are an output checker of the request's project.
    Person { user: &'a str, checker: bool },
}

/// What happens to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The content arrived, matched the declared SHA-256, and the checks ran.
    Checked,
    /// The checks refuse the file outright (an archive, an executable): no one reviews it.
    Refuse,
    Review {
        decision: Decision,
        reason: &'a str,
    },
    Withdraw,
    /// The requester downloaded the approved file.
    Release,
    /// The project's retention passed before a decision (or a download).
    Expire,
}

impl Event<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Checked => "checked",
            Event::Refuse => "refuse",
            Event::Review { decision, .. } => decision.as_str(),
            Event::Withdraw => "withdraw",
            Event::Release => "release",
            Event::Expire => "expire",
        }
    }
}

/// What the machine needs to know about a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts<'a> {
    pub state: State,
    pub requester: &'a str,
    /// Who reviewed already (one decision each).
    pub reviewers: &'a [&'a str],
    /// Approvals so far (distinct reviewers).
    pub approvals: u32,
    /// Distinct approvals release needs (the project's `output.reviewers`, at least 1).
    pub required: u32,
}

/// Why an event is refused. `code()` is the API's error code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{event} is not possible on a request that is {state}")]
    WrongState { state: State, event: &'static str },
    #[error("{user} submitted this request and may not review it")]
    SelfReview { user: String },
    #[error("{user} is not an output checker of this project")]
    NotAChecker { user: String },
    #[error("{user} has already reviewed this request; decisions are final")]
    AlreadyReviewed { user: String },
    #[error("a {decision} decision needs a reason")]
    ReasonRequired { decision: &'static str },
    #[error("only the requester may {event} this request")]
    NotTheRequester { event: &'static str },
    #[error("only the control plane may {event} a request")]
    SystemOnly { event: &'static str },
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::WrongState { .. } => "wrongState",
            Refusal::SelfReview { .. } => "selfReview",
            Refusal::NotAChecker { .. } => "notAChecker",
            Refusal::AlreadyReviewed { .. } => "alreadyReviewed",
            Refusal::ReasonRequired { .. } => "reasonRequired",
            Refusal::NotTheRequester { .. } => "notTheRequester",
            Refusal::SystemOnly { .. } => "systemOnly",
        }
    }
}

/// Longest reason kept.
pub const MAX_REASON: usize = 2000;

/// The state after `event` by `actor`, or why it is refused. Who may act is checked before the
/// state, so a refused actor learns nothing about where the request is.
pub fn transition(facts: &Facts<'_>, actor: Actor<'_>, event: Event<'_>) -> Result<State, Refusal> {
    let name = event.name();
    let wrong = || Refusal::WrongState { state: facts.state, event: name };
    match event {
        Event::Checked | Event::Refuse | Event::Expire => {
            if actor != Actor::System {
                return Err(Refusal::SystemOnly { event: name });
            }
            match (event, facts.state) {
                (Event::Checked, State::Submitted) => Ok(State::Checked),
                (Event::Refuse, State::Submitted | State::Checked) => Ok(State::Rejected),
                (Event::Expire, State::Submitted | State::Checked | State::InReview | State::Approved) => {
                    Ok(State::Expired)
                }
                _ => Err(wrong()),
            }
        }
        Event::Withdraw | Event::Release => {
            let Actor::Person { user, .. } = actor else { return Err(Refusal::NotTheRequester { event: name }) };
            if user != facts.requester {
                return Err(Refusal::NotTheRequester { event: name });
            }
            match (event, facts.state) {
                (Event::Withdraw, State::Submitted | State::Checked | State::InReview | State::Approved) => {
                    Ok(State::Withdrawn)
                }
                (Event::Release, State::Approved) => Ok(State::Released),
                _ => Err(wrong()),
            }
        }
        Event::Review { decision, reason } => {
            let Actor::Person { user, checker } = actor else {
                return Err(Refusal::NotAChecker { user: "system".into() });
            };
            if user == facts.requester {
                return Err(Refusal::SelfReview { user: user.into() });
            }
            if !checker {
                return Err(Refusal::NotAChecker { user: user.into() });
            }
            if decision.needs_reason() && reason.trim().is_empty() {
                return Err(Refusal::ReasonRequired { decision: decision.as_str() });
            }
            if !facts.state.open_for_review() {
                return Err(wrong());
            }
            if facts.reviewers.contains(&user) {
                return Err(Refusal::AlreadyReviewed { user: user.into() });
            }
            Ok(match decision {
                Decision::Reject => State::Rejected,
                Decision::RequestChanges => State::ChangesRequested,
                Decision::Approve if facts.approvals + 1 >= facts.required.max(1) => State::Approved,
                Decision::Approve => State::InReview,
            })
        }
    }
}

/// A request as the sweeper sees it. Times are Unix seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held<'a> {
    pub id: &'a str,
    pub state: State,
    /// When the request got into its current state.
    pub since: i64,
    /// Whether sealed content is still stored.
    pub has_content: bool,
    /// The project's retention, in seconds.
    pub retention: i64,
}

/// One thing the sweeper must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sweep<'a> {
    /// Undecided (or approved and never downloaded) for longer than retention: expire it (and
    /// its content goes one retention later, like any final request).
    Expire(&'a str),
    /// Final for longer than retention: delete the stored content; metadata and receipt stay.
    DeleteContent(&'a str),
}

/// What to do now, given the requests (pure; the sweeper does the I/O).
pub fn sweep<'a>(held: &[Held<'a>], now: i64) -> Vec<Sweep<'a>> {
    let mut out = Vec::new();
    for h in held {
        let aged = now.saturating_sub(h.since) >= h.retention;
        if !aged {
            continue;
        }
        if h.state.content_disposable() {
            if h.has_content {
                out.push(Sweep::DeleteContent(h.id));
            }
        } else {
            out.push(Sweep::Expire(h.id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    const ALICE: &str = "alice@x";
    const BOB: &str = "bob@x";
    const CAROL: &str = "carol@x";

    fn facts(state: State) -> Facts<'static> {
        Facts { state, requester: ALICE, reviewers: &[], approvals: 0, required: 2 }
    }

    fn checker(user: &str) -> Actor<'_> {
        Actor::Person { user, checker: true }
    }

    fn events() -> Vec<Event<'static>> {
        let mut e = vec![Event::Checked, Event::Refuse, Event::Withdraw, Event::Release, Event::Expire];
        for d in Decision::ALL {
            e.push(Event::Review { decision: d, reason: "cell of 7" });
        }
        e
    }

    /// The whole table, written out by hand: for each state, the right actor, the result.
    fn expected(state: State, event: Event<'_>) -> Option<State> {
        match (state, event) {
            (Submitted, Event::Checked) => Some(Checked),
            (Submitted | Checked, Event::Refuse) => Some(Rejected),
            (Submitted | Checked | InReview | Approved, Event::Withdraw) => Some(Withdrawn),
            (Submitted | Checked | InReview | Approved, Event::Expire) => Some(Expired),
            (Approved, Event::Release) => Some(Released),
            (Checked | InReview, Event::Review { decision: Decision::Approve, .. }) => Some(InReview),
            (Checked | InReview, Event::Review { decision: Decision::Reject, .. }) => Some(Rejected),
            (Checked | InReview, Event::Review { decision: Decision::RequestChanges, .. }) => Some(ChangesRequested),
            _ => None,
        }
    }

    fn right_actor(event: Event<'_>) -> Actor<'static> {
        match event {
            Event::Checked | Event::Refuse | Event::Expire => Actor::System,
            Event::Withdraw | Event::Release => Actor::Person { user: ALICE, checker: false },
            Event::Review { .. } => checker(BOB),
        }
    }

    #[test]
    fn every_state_and_event_with_the_right_actor() {
        for state in State::ALL {
            for event in events() {
                let got = transition(&facts(state), right_actor(event), event);
                match expected(state, event) {
                    Some(next) => assert_eq!(got, Ok(next), "{state} + {}", event.name()),
                    None => assert_eq!(
                        got,
                        Err(Refusal::WrongState { state, event: event.name() }),
                        "{state} + {}",
                        event.name()
                    ),
                }
            }
        }
    }

    #[test]
    fn final_states_accept_nothing() {
        for state in State::ALL.into_iter().filter(|s| s.is_final()) {
            for event in events() {
                for actor in [Actor::System, checker(BOB), Actor::Person { user: ALICE, checker: false }] {
                    assert!(transition(&facts(state), actor, event).is_err(), "{state} + {}", event.name());
                }
            }
        }
    }

    #[test]
    fn every_event_by_every_wrong_actor_is_refused_whatever_the_state() {
        for state in State::ALL {
            let f = facts(state);
            for event in events() {
                let wrong: Vec<Actor<'_>> = match event {
                    Event::Checked | Event::Refuse | Event::Expire => {
                        vec![checker(BOB), Actor::Person { user: ALICE, checker: true }]
                    }
                    Event::Withdraw | Event::Release => vec![Actor::System, checker(BOB)],
                    Event::Review { .. } => vec![
                        Actor::System,
                        Actor::Person { user: CAROL, checker: false },
                        Actor::Person { user: ALICE, checker: true },
                    ],
                };
                for actor in wrong {
                    let got = transition(&f, actor, event);
                    assert!(
                        !matches!(got, Ok(_) | Err(Refusal::WrongState { .. })),
                        "{state} + {} by {actor:?}: {got:?}",
                        event.name()
                    );
                }
            }
        }
    }

    #[test]
    fn the_requester_never_reviews_even_as_a_checker() {
        let got =
            transition(&facts(Checked), checker(ALICE), Event::Review { decision: Decision::Approve, reason: "" });
        assert_eq!(got, Err(Refusal::SelfReview { user: ALICE.into() }));
        assert_eq!(got.unwrap_err().code(), "selfReview");
    }

    #[test]
    fn approvals_count_distinct_reviewers_up_to_the_project_setting() {
        let approve = Event::Review { decision: Decision::Approve, reason: "" };
        let one = Facts { state: InReview, reviewers: &[BOB], approvals: 1, ..facts(InReview) };
        assert_eq!(transition(&one, checker(CAROL), approve), Ok(Approved));
        assert_eq!(transition(&one, checker(BOB), approve), Err(Refusal::AlreadyReviewed { user: BOB.into() }));
        let three = Facts { required: 3, ..one.clone() };
        assert_eq!(transition(&three, checker(CAROL), approve), Ok(InReview));
        let single = Facts { required: 1, ..facts(Checked) };
        assert_eq!(transition(&single, checker(BOB), approve), Ok(Approved));
        // A zero setting still needs one approval.
        let zero = Facts { required: 0, ..facts(Checked) };
        assert_eq!(transition(&zero, checker(BOB), approve), Ok(Approved));
        // One rejection rejects, whatever the approvals so far.
        let reject = Event::Review { decision: Decision::Reject, reason: "cell of 7" };
        assert_eq!(transition(&one, checker(CAROL), reject), Ok(Rejected));
    }

    #[test]
    fn rejections_and_change_requests_need_a_reason() {
        for decision in [Decision::Reject, Decision::RequestChanges] {
            for reason in ["", "   "] {
                let got = transition(&facts(Checked), checker(BOB), Event::Review { decision, reason });
                assert_eq!(got, Err(Refusal::ReasonRequired { decision: decision.as_str() }));
            }
        }
    }

    #[test]
    fn names_round_trip_and_match_serde() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
        }
        for d in Decision::ALL {
            assert_eq!(Decision::parse(d.as_str()), Some(d));
            assert_eq!(serde_json::to_value(d).unwrap(), serde_json::json!(d.as_str()));
        }
        assert_eq!(State::parse("pendingReview"), None);
    }

    #[test]
    fn the_sweeper_expires_the_undecided_and_deletes_final_content_after_retention() {
        let day = 86_400;
        let held =
            |id: &'static str, state, since, has_content| Held { id, state, since, has_content, retention: 30 * day };
        let now = 100 * day;
        let items = [
            held("fresh", Checked, now - day, true),
            held("stale", InReview, now - 31 * day, true),
            held("unfetched", Approved, now - 30 * day, true),
            held("released", Released, now - 31 * day, true),
            held("released-recent", Released, now - 2 * day, true),
            held("rejected", Rejected, now - 40 * day, true),
            held("gone", Rejected, now - 40 * day, false),
            held("withdrawn", Withdrawn, now - 40 * day, true),
        ];
        assert_eq!(
            sweep(&items, now),
            vec![
                Sweep::Expire("stale"),
                Sweep::Expire("unfetched"),
                Sweep::DeleteContent("released"),
                Sweep::DeleteContent("rejected"),
                Sweep::DeleteContent("withdrawn"),
            ]
        );
    }
}
