//! The SDK's failover for one call, as a state machine without IO.
//!
//! The caller (the SDK's async loop) performs what [`Next`] asks for — resolve the route, send
//! the request to one candidate, wait — and reports back: [`Failover::on_route`] with the
//! candidates in the order it would try them, [`Failover::on_outcome`] with what a node did.
//! The rules (`docs/concepts.md`, "The request path", step 5):
//!
//! - A node that refuses with an error another node may not have (`overloaded`, `no_capacity`,
//!   `shutting_down`, `model_load_failed`: [`Outcome::Refused`]) or cannot be reached
//!   ([`Outcome::Unreachable`]) counts as a failover; the call moves on to the next candidate.
//!   Such a node is banned for a while ([`Outcome::penalty`]); an unreachable one also loses its
//!   connection and the cached route.
//! - A stale ticket ([`Outcome::StaleTicket`]: expired, or signed by a key the node has not
//!   learnt yet) makes the call resolve afresh and try that node again, once per call; the
//!   retry does not count as an attempt.
//! - Any other error ([`Outcome::Final`], the deadline passing included) ends the call.
//! - When every candidate of a route has failed, the call backs off (full jitter, 10 ms doubling
//!   to 1 s, within the deadline) and resolves afresh, once.
//! - At most `max_attempts` nodes are tried, all within one deadline.
//!
//! A served call needs no decision: the caller returns the answer (and [`Failover::failovers`]).
//!
//! Time is `now_us`, µs since the call began (the deadline is on the same clock); randomness
//! (the backoff's jitter) comes in as `&mut impl Rng`.

use crate::load::retry_delay_us;
use rand::Rng;

/// Limits of one call's failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverConfig {
    /// Nodes tried per call before giving up (default 3).
    pub max_attempts: u32,
    /// The first backoff's ceiling before the one fresh resolve, µs (default 10 ms).
    pub backoff_base_us: u64,
    /// The backoff's largest ceiling, µs (default 1 s).
    pub backoff_max_us: u64,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            max_attempts: 3,
            backoff_base_us: 10_000,
            backoff_max_us: 1_000_000,
        }
    }
}

/// What a node did with the request, as the caller classified it. `E` is the caller's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<E> {
    /// The node refused with an error another node may not have (`overloaded`,
    /// `no_capacity`, `shutting_down`, `model_load_failed`).
    Refused(E),
    /// The node could not be reached, or the connection failed mid-call.
    Unreachable(E),
    /// The node refused the route ticket (`invalid_ticket`).
    StaleTicket(E),
    /// Any other error, the deadline passing included: it goes back to the caller.
    Final(E),
}

/// What the caller does to the node of an [`Outcome`] before it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Penalty {
    /// Nothing.
    None,
    /// Count a failure against the node, so that calls avoid it for a while.
    Ban,
    /// Ban it, drop the connection to it and forget the cached route: it may be gone.
    BanAndForget,
}

impl<E> Outcome<E> {
    /// What the caller does to the node that gave this outcome.
    pub fn penalty(&self) -> Penalty {
        match self {
            Outcome::Refused(_) => Penalty::Ban,
            Outcome::Unreachable(_) => Penalty::BanAndForget,
            Outcome::StaleTicket(_) | Outcome::Final(_) => Penalty::None,
        }
    }
}

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next<E> {
    /// Resolve the route, then report its candidates with [`Failover::on_route`]. `fresh`:
    /// forget the cached route first and ask the coordinator.
    Resolve {
        /// Forget the cached route first.
        fresh: bool,
    },
    /// Send the request to this candidate (an index into the list given to
    /// [`Failover::on_route`]), then report with [`Failover::on_outcome`].
    TryNode(usize),
    /// Wait this long (µs), then resolve afresh (as [`Next::Resolve`] with `fresh`).
    Backoff(u64),
    /// Give up: return this to the caller.
    Fail(Failure<E>),
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure<E> {
    /// This error: the one that ended the call, or the last one a node gave.
    Error(E),
    /// The deadline passed (or no attempt was allowed) before any node gave an error.
    Deadline,
    /// No node could serve and none gave an error: the routes listed no candidate.
    NoCandidate,
}

/// One call's failover state (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Failover<E> {
    cfg: FailoverConfig,
    deadline_us: u64,
    /// Nodes tried (a node whose ticket was refreshed is taken off again).
    tried: Vec<String>,
    /// The current route's candidates, in the caller's order, and the next one to try.
    order: Vec<String>,
    next: usize,
    attempts: u32,
    failovers: u32,
    /// Backoff rounds so far (the jitter's exponent).
    round: u32,
    /// The one fresh resolve after a backoff was spent.
    resolved_fresh: bool,
    /// The one ticket refresh of this call was spent.
    ticket_refreshed: bool,
    last: Option<E>,
}

impl<E> Failover<E> {
    /// A call that must end by `deadline_us` (µs since it began). Start with
    /// [`Next::Resolve`] (not fresh: a cached route will do).
    pub fn new(cfg: FailoverConfig, deadline_us: u64) -> Self {
        Failover {
            cfg,
            deadline_us,
            tried: Vec::new(),
            order: Vec::new(),
            next: 0,
            attempts: 0,
            failovers: 0,
            round: 0,
            resolved_fresh: false,
            ticket_refreshed: false,
            last: None,
        }
    }

    /// The first step of every call.
    pub fn start(&self) -> Next<E> {
        Next::Resolve { fresh: false }
    }

    /// Nodes tried so far: the caller leaves them out of the candidates it reports.
    pub fn tried(&self) -> &[String] {
        &self.tried
    }

    /// Nodes that failed and were moved on from.
    pub fn failovers(&self) -> u32 {
        self.failovers
    }

    /// Nodes tried, not counting a retry after a ticket refresh.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// A route was resolved: `candidates` are its node ids, untried ones, in the order the
    /// caller would try them.
    pub fn on_route<S: Into<String>>(
        &mut self,
        now_us: u64,
        candidates: impl IntoIterator<Item = S>,
        rng: &mut impl Rng,
    ) -> Next<E> {
        self.order.clear();
        self.order.extend(candidates.into_iter().map(Into::into));
        self.next = 0;
        self.advance(now_us, rng)
    }

    /// The node of the last [`Next::TryNode`] failed this way (after the caller applied its
    /// [`Outcome::penalty`]).
    pub fn on_outcome(&mut self, now_us: u64, outcome: Outcome<E>, rng: &mut impl Rng) -> Next<E> {
        match outcome {
            Outcome::StaleTicket(e) if !self.ticket_refreshed => {
                // Resolve afresh and try the same node again: not a new attempt.
                self.ticket_refreshed = true;
                self.tried.pop();
                self.attempts = self.attempts.saturating_sub(1);
                self.last = Some(e);
                Next::Resolve { fresh: true }
            }
            Outcome::StaleTicket(e) | Outcome::Final(e) => Next::Fail(Failure::Error(e)),
            Outcome::Refused(e) | Outcome::Unreachable(e) => {
                self.failovers += 1;
                self.last = Some(e);
                self.advance(now_us, rng)
            }
        }
    }

    /// The next candidate of the current route, or the end of the round.
    fn advance(&mut self, now_us: u64, rng: &mut impl Rng) -> Next<E> {
        let Some(node) = self.order.get(self.next) else {
            return self.round_failed(now_us, rng);
        };
        if self.attempts >= self.cfg.max_attempts {
            return self.fail_or(Failure::Deadline);
        }
        self.attempts += 1;
        self.tried.push(node.clone());
        let index = self.next;
        self.next += 1;
        if now_us >= self.deadline_us {
            return self.fail_or(Failure::Deadline);
        }
        Next::TryNode(index)
    }

    /// Every candidate of the route failed: back off and resolve afresh, once.
    fn round_failed(&mut self, now_us: u64, rng: &mut impl Rng) -> Next<E> {
        if self.resolved_fresh || self.attempts >= self.cfg.max_attempts {
            return self.fail_or(Failure::NoCandidate);
        }
        let pause = retry_delay_us(
            self.round,
            self.cfg.backoff_base_us,
            self.cfg.backoff_max_us,
            rng,
        );
        self.round += 1;
        if now_us.saturating_add(pause) >= self.deadline_us {
            return self.fail_or(Failure::Deadline);
        }
        self.resolved_fresh = true;
        Next::Backoff(pause)
    }

    /// Fail with the last node error, else with `otherwise`.
    fn fail_or(&mut self, otherwise: Failure<E>) -> Next<E> {
        Next::Fail(self.last.take().map_or(otherwise, Failure::Error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const SEC: u64 = 1_000_000;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn call() -> Failover<&'static str> {
        Failover::new(FailoverConfig::default(), 30 * SEC)
    }

    /// The node ids tried so far, in order.
    fn tried_ids<'a>(f: &'a Failover<&'static str>) -> Vec<&'a str> {
        f.tried().iter().map(String::as_str).collect()
    }

    #[test]
    fn a_call_starts_with_the_cached_route_and_tries_candidates_in_the_given_order() {
        let mut f = call();
        let mut r = rng();
        assert_eq!(f.start(), Next::Resolve { fresh: false });
        assert_eq!(f.on_route(0, ["a", "b", "c"], &mut r), Next::TryNode(0));
        assert_eq!(tried_ids(&f), ["a"]);
        assert_eq!((f.attempts(), f.failovers()), (1, 0));
    }

    #[test]
    fn refused_and_unreachable_move_on_to_the_next_candidate_and_count_as_failovers() {
        let mut f = call();
        let mut r = rng();
        assert_eq!(f.on_route(0, ["a", "b", "c"], &mut r), Next::TryNode(0));
        assert_eq!(
            f.on_outcome(1, Outcome::Refused("overloaded"), &mut r),
            Next::TryNode(1)
        );
        assert_eq!(
            f.on_outcome(2, Outcome::Unreachable("reset"), &mut r),
            Next::TryNode(2)
        );
        assert_eq!(tried_ids(&f), ["a", "b", "c"]);
        assert_eq!((f.attempts(), f.failovers()), (3, 2));
    }

    #[test]
    fn penalties_ban_refusing_nodes_and_forget_unreachable_ones() {
        assert_eq!(Outcome::Refused(()).penalty(), Penalty::Ban);
        assert_eq!(Outcome::Unreachable(()).penalty(), Penalty::BanAndForget);
        assert_eq!(Outcome::StaleTicket(()).penalty(), Penalty::None);
        assert_eq!(Outcome::Final(()).penalty(), Penalty::None);
    }

    #[test]
    fn a_final_error_ends_the_call_at_once_whatever_is_left() {
        let mut f = call();
        let mut r = rng();
        f.on_route(0, ["a", "b"], &mut r);
        assert_eq!(
            f.on_outcome(1, Outcome::Final("invalid_input"), &mut r),
            Next::Fail(Failure::Error("invalid_input"))
        );
        // Also after a failover: the final error, not the earlier one.
        let mut f = call();
        f.on_route(0, ["a", "b"], &mut r);
        f.on_outcome(1, Outcome::Refused("overloaded"), &mut r);
        assert_eq!(
            f.on_outcome(2, Outcome::Final("deadline"), &mut r),
            Next::Fail(Failure::Error("deadline"))
        );
        assert_eq!(f.failovers(), 1);
    }

    #[test]
    fn a_stale_ticket_resolves_afresh_and_retries_the_same_node_once_per_call() {
        let mut f = call();
        let mut r = rng();
        f.on_route(0, ["a", "b"], &mut r);
        assert_eq!(
            f.on_outcome(1, Outcome::StaleTicket("ticket expired"), &mut r),
            Next::Resolve { fresh: true }
        );
        // `a` is untried again and the retry is not a new attempt.
        assert!(f.tried().is_empty());
        assert_eq!((f.attempts(), f.failovers()), (0, 0));
        assert_eq!(f.on_route(2, ["a", "b"], &mut r), Next::TryNode(0));
        assert_eq!(tried_ids(&f), ["a"]);
        // A second stale ticket in the same call goes back to the caller.
        assert_eq!(
            f.on_outcome(3, Outcome::StaleTicket("unknown key"), &mut r),
            Next::Fail(Failure::Error("unknown key"))
        );
    }

    #[test]
    fn a_stale_ticket_on_a_later_candidate_keeps_the_earlier_ones_tried() {
        let mut f = call();
        let mut r = rng();
        f.on_route(0, ["a", "b", "c"], &mut r);
        f.on_outcome(1, Outcome::Refused("overloaded"), &mut r);
        assert_eq!(
            f.on_outcome(2, Outcome::StaleTicket("expired"), &mut r),
            Next::Resolve { fresh: true }
        );
        assert_eq!(tried_ids(&f), ["a"]);
        assert_eq!((f.attempts(), f.failovers()), (1, 1));
        // The fresh route (the caller leaves `a` out) starts over with `b`.
        assert_eq!(f.on_route(3, ["b", "c"], &mut r), Next::TryNode(0));
        assert_eq!(tried_ids(&f), ["a", "b"]);
        // The ticket refresh was not the one fresh resolve: a failed round still backs off.
        f.on_outcome(4, Outcome::Refused("overloaded"), &mut r);
        assert_eq!(f.attempts(), 3);
        assert_eq!(
            f.on_outcome(5, Outcome::Refused("no_capacity"), &mut r),
            Next::Fail(Failure::Error("no_capacity")),
            "three attempts spent: no backoff"
        );
    }

    #[test]
    fn a_failed_round_backs_off_within_the_ceiling_then_resolves_afresh_once() {
        for seed in 0..200 {
            let mut r = StdRng::seed_from_u64(seed);
            let mut f = call();
            f.on_route(0, ["a"], &mut r);
            let Next::Backoff(us) = f.on_outcome(1, Outcome::Refused("overloaded"), &mut r) else {
                panic!("seed {seed}: expected a backoff");
            };
            assert!(
                us <= 10_000,
                "seed {seed}: round 0 waits at most 10 ms, got {us}"
            );
            // The fresh route: `a` left out by the caller, `b` new.
            assert_eq!(f.on_route(1 + us, ["b"], &mut r), Next::TryNode(0));
            // The second failed round ends the call with the last error, no second backoff.
            assert_eq!(
                f.on_outcome(2 + us, Outcome::Unreachable("reset"), &mut r),
                Next::Fail(Failure::Error("reset"))
            );
            assert_eq!(f.failovers(), 2);
        }
    }

    #[test]
    fn an_empty_route_backs_off_once_then_fails_with_no_candidate() {
        let mut f = call();
        let mut r = rng();
        let Next::Backoff(_) = f.on_route(0, Vec::<String>::new(), &mut r) else {
            panic!("expected a backoff");
        };
        assert_eq!(
            f.on_route(SEC, Vec::<String>::new(), &mut r),
            Next::Fail(Failure::NoCandidate)
        );
    }

    #[test]
    fn at_most_max_attempts_nodes_are_tried() {
        let mut f = Failover::new(
            FailoverConfig {
                max_attempts: 2,
                ..FailoverConfig::default()
            },
            30 * SEC,
        );
        let mut r = rng();
        f.on_route(0, ["a", "b", "c"], &mut r);
        f.on_outcome(1, Outcome::Refused("one"), &mut r);
        assert_eq!(
            f.on_outcome(2, Outcome::Refused("two"), &mut r),
            Next::Fail(Failure::Error("two"))
        );
        assert_eq!(tried_ids(&f), ["a", "b"]);
        // Attempts spent at the end of a round: no backoff either.
        let mut f = Failover::new(
            FailoverConfig {
                max_attempts: 1,
                ..FailoverConfig::default()
            },
            30 * SEC,
        );
        f.on_route(0, ["a"], &mut r);
        assert_eq!(
            f.on_outcome(1, Outcome::Unreachable("gone"), &mut r),
            Next::Fail(Failure::Error("gone"))
        );
    }

    #[test]
    fn no_attempt_allowed_fails_as_a_deadline() {
        let mut f = Failover::<&str>::new(
            FailoverConfig {
                max_attempts: 0,
                ..FailoverConfig::default()
            },
            30 * SEC,
        );
        assert_eq!(
            f.on_route(0, ["a"], &mut rng()),
            Next::Fail(Failure::Deadline)
        );
        assert!(f.tried().is_empty());
    }

    #[test]
    fn the_deadline_stops_the_next_attempt_with_the_last_error_or_a_deadline() {
        let mut r = rng();
        // Passed before the first try: a deadline failure.
        let mut f = Failover::<&str>::new(FailoverConfig::default(), SEC);
        assert_eq!(
            f.on_route(SEC, ["a"], &mut r),
            Next::Fail(Failure::Deadline)
        );
        // Passed after a failover: the node's error.
        let mut f = Failover::new(FailoverConfig::default(), SEC);
        assert_eq!(f.on_route(0, ["a", "b"], &mut r), Next::TryNode(0));
        assert_eq!(
            f.on_outcome(SEC, Outcome::Refused("overloaded"), &mut r),
            Next::Fail(Failure::Error("overloaded"))
        );
        // One µs before the deadline the next candidate is still tried.
        let mut f = Failover::new(FailoverConfig::default(), SEC);
        f.on_route(0, ["a", "b"], &mut r);
        assert_eq!(
            f.on_outcome(SEC - 1, Outcome::Refused("overloaded"), &mut r),
            Next::TryNode(1)
        );
    }

    #[test]
    fn a_backoff_that_would_reach_the_deadline_fails_instead() {
        for seed in 0..200 {
            let mut r = StdRng::seed_from_u64(seed);
            // The deadline is 10 ms away at most: any non-zero draw from [0, 10 ms] may reach it.
            let deadline = 10_000;
            let mut f = Failover::new(FailoverConfig::default(), deadline);
            f.on_route(0, ["a"], &mut r);
            // Predict the draw with a clone of the RNG.
            let mut probe = r.clone();
            let pause = retry_delay_us(0, 10_000, 1_000_000, &mut probe);
            let next = f.on_outcome(1, Outcome::Refused("overloaded"), &mut r);
            if 1 + pause >= deadline {
                assert_eq!(
                    next,
                    Next::Fail(Failure::Error("overloaded")),
                    "seed {seed}"
                );
            } else {
                assert_eq!(next, Next::Backoff(pause), "seed {seed}");
            }
        }
        // The deadline already passed: never a backoff.
        let mut r = rng();
        let mut f = Failover::new(FailoverConfig::default(), SEC);
        f.on_route(0, ["a"], &mut r);
        assert_eq!(
            f.on_outcome(2 * SEC, Outcome::Refused("overloaded"), &mut r),
            Next::Fail(Failure::Error("overloaded"))
        );
    }

    #[test]
    fn the_one_backoff_of_a_call_is_drawn_up_to_the_configured_base() {
        // One backoff per call, so its ceiling is the base (the first round's), within the max.
        let cfg = FailoverConfig {
            backoff_base_us: 40_000,
            backoff_max_us: 50_000,
            ..FailoverConfig::default()
        };
        let mut seen_max = 0;
        for seed in 0..500 {
            let mut r = StdRng::seed_from_u64(seed);
            let mut f = Failover::new(cfg, 30 * SEC);
            f.on_route(0, ["a"], &mut r);
            let Next::Backoff(us) = f.on_outcome(1, Outcome::Refused("x"), &mut r) else {
                panic!("seed {seed}: expected a backoff");
            };
            assert!(us <= 40_000, "seed {seed}: {us}");
            seen_max = seen_max.max(us);
        }
        assert!(seen_max > 30_000, "the draw spans its range: {seen_max}");
    }

    #[test]
    fn every_path_ends_within_max_attempts_plus_one_ticket_refresh() {
        // Exhaustive over outcome sequences of length 6 on routes of up to 3 candidates: no
        // node is tried more than `max_attempts` times counting from the ticket refresh, the
        // machine always ends (Fail), and a fresh resolve happens at most twice (one ticket
        // refresh, one backoff).
        let kinds = 4usize;
        let len = 6u32;
        for code in 0..kinds.pow(len) {
            let mut seq: Vec<usize> = (0..len).map(|i| code / kinds.pow(i) % kinds).collect();
            let mut r = rng();
            let mut f = Failover::new(FailoverConfig::default(), 30 * SEC);
            let mut next = f.start();
            let mut resolves = 0;
            let mut tries = 0;
            let mut now = 0;
            let ended = loop {
                now += 1;
                next = match next {
                    Next::Resolve { .. } => {
                        resolves += 1;
                        let all = ["a", "b", "c"];
                        let untried: Vec<&str> = all
                            .iter()
                            .copied()
                            .filter(|n| !f.tried().iter().any(|t| t == n))
                            .collect();
                        f.on_route(now, untried, &mut r)
                    }
                    Next::Backoff(us) => {
                        now += us;
                        Next::Resolve { fresh: true }
                    }
                    Next::TryNode(_) => {
                        tries += 1;
                        let Some(k) = seq.pop() else { break false };
                        let o = match k {
                            0 => Outcome::Refused("refused"),
                            1 => Outcome::Unreachable("unreachable"),
                            2 => Outcome::StaleTicket("ticket"),
                            _ => Outcome::Final("final"),
                        };
                        f.on_outcome(now, o, &mut r)
                    }
                    Next::Fail(_) => break true,
                };
            };
            assert!(ended, "sequence {code}: still trying after 6 outcomes");
            assert!(f.attempts() <= 3, "sequence {code}");
            assert!(tries <= 4, "sequence {code}: {tries} tries");
            assert!(resolves <= 3, "sequence {code}: {resolves} resolves");
        }
    }
}
