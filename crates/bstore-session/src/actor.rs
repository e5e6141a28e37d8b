//! One session's actor.
//!
//! The state lives here between requests; a request moves it into its
//! future, which loads it first if needed (see [`crate::load`]), and gives it
//! back when done. After each append the log acknowledged, the actor hands
//! the event to its [`Projector`], which updates Redis off the reply path.
//!
//! **The rule** (ARCHITECTURE.md, "One owner per session"): a reply — to a
//! write or a read — is given only from a state that holds every event the
//! log had stored for the session when the request arrived. The actor keeps
//! it so:
//! - it serves only while this instance holds the lease of the session's
//!   partition (the sole writer of the session), under the epoch its state
//!   was loaded in, and checks that again just before it answers;
//! - a write that changes nothing is acknowledged only after the log
//!   confirms that its last event of the session is the one the state has;
//! - a state found ahead of the log (data loss under it, a restore) is
//!   dropped and reloaded, never used to wedge the session.

pub(crate) mod restore;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use bstore_cluster::Ownership;
use bstore_domain::{Limits, SessionKey, SessionState};
use bstore_log::{EventLog, LogError};
use bstore_redis::RedisProjection;
use futures_util::FutureExt;
use futures_util::future::Shared;
use tokio::sync::oneshot;

use crate::claims::{Claimed, Claims};
use crate::projector::Projector;
use crate::rids::RecentRids;
use crate::snapshotter::SnapTrack;
use crate::stats::{ClaimEvent, claim_event};
use crate::{Op, Reply, Request, SessionConfig, SessionError};

/// What every session actor shares: the log, the Redis projection (if
/// configured), the ownership gate, the limits, the settings.
pub(crate) struct Env {
    pub log: EventLog,
    pub redis: Option<RedisProjection>,
    pub ownership: Ownership,
    pub limits: Limits,
    pub cfg: SessionConfig,
}

/// Resolves when the previous actor of the same session has stopped.
pub(crate) type Predecessor = Shared<futures_util::future::BoxFuture<'static, ()>>;

/// A loaded session: its state, the ownership epoch it was loaded under,
/// the request ids of its recent events, and what it has appended since its
/// last snapshot.
struct Live {
    st: SessionState,
    epoch: u64,
    rids: RecentRids,
    snap: SnapTrack,
}

/// Owns one session's state and serializes everything done to it.
pub struct SessionActor {
    key: SessionKey,
    partition: u32,
    /// The registry's number for this actor, to tell it apart from a later
    /// actor of the same session.
    generation: u64,
    env: Arc<Env>,
    /// `None` until loaded, and again after a load failed or the partition
    /// was lost. While a request is processed the state is moved into its
    /// future; the atomic response guarantees nobody looks meanwhile.
    live: Option<Live>,
    /// The session's writer claim. Outlives `live` (a reload does not end
    /// a claim's lease); moved into a request's future like it.
    claims: Claims,
    last_used: Instant,
    /// The Redis projection queue, started with the actor when Redis is
    /// configured.
    projector: Option<Projector>,
    /// The previous actor of this session, still finishing its mailbox: no
    /// request runs here before it has stopped.
    predecessor: Option<Predecessor>,
    /// Told when this actor has stopped (set by [`Passivate`]).
    on_stop: Option<oneshot::Sender<()>>,
    registry: Recipient<Idle>,
}

impl SessionActor {
    pub(crate) fn new(
        key: SessionKey,
        generation: u64,
        env: Arc<Env>,
        predecessor: Option<Predecessor>,
        registry: Recipient<Idle>,
    ) -> Self {
        let partition = env.ownership.partition(&key);
        Self {
            key,
            partition,
            generation,
            env,
            live: None,
            claims: Claims::default(),
            last_used: Instant::now(),
            projector: None,
            predecessor,
            on_stop: None,
            registry,
        }
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(redis) = &self.env.redis {
            self.projector = Some(Projector::start(self.key.clone(), redis.clone()));
            // A copy left behind by a Redis outage catches up even when no
            // write comes to carry a snapshot.
            ctx.run_interval(redis.config().catch_up_interval, |act, _| {
                if let (Some(p), Some(live)) = (&act.projector, &act.live) {
                    p.catch_up(&live.st);
                }
            });
        }
        let idle = self.env.cfg.idle_timeout();
        ctx.run_interval(idle / 4, move |act, _| {
            if act.last_used.elapsed() >= idle {
                // The registry stops idle actors itself, so that nothing it
                // routes here afterwards is lost.
                act.registry.do_send(Idle { key: act.key.clone(), generation: act.generation });
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(tx) = self.on_stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Tells the registry that an actor has been idle for the idle time.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Idle {
    pub key: SessionKey,
    pub generation: u64,
}

/// Asks an actor to stop once the requests already in its mailbox are done;
/// `done` is told when it has stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Passivate {
    pub done: oneshot::Sender<()>,
    /// Bring a stale Redis copy up to date first. Not for a session that
    /// was erased: its state in memory is what the erasure removed.
    pub project: bool,
}

impl SessionActor {
    /// Last chance to bring a stale Redis copy up to date: the projection
    /// task outlives the actor until its queue is drained.
    fn final_catch_up(&self) {
        if let (Some(p), Some(live)) = (&self.projector, &self.live) {
            p.catch_up(&live.st);
        }
    }
}

impl Handler<Passivate> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: Passivate, ctx: &mut Self::Context) {
        if msg.project {
            self.final_catch_up();
            if let Some(live) = &mut self.live {
                live.snap.on_stop(&self.env.cfg, &self.env.log, &self.key, &live.st);
            }
        } else {
            self.live = None;
        }
        self.on_stop = Some(msg.done);
        // A claim granted here may still be in use by its holder: the next
        // actor of the session, which knows no claim, must not let another
        // writer in before its lease has run out, so this one stops (and
        // the next one starts) only then.
        let left = self.claims.close(Instant::now());
        if left.is_zero() {
            ctx.stop();
        } else {
            tracing::debug!(session = %self.key, left_ms = left.as_millis() as u64, "stopping once the writer claim's lease has run out");
            ctx.run_later(left, |_, ctx| ctx.stop());
        }
    }
}

/// A request with the channel its answer goes back on. Sent with
/// `do_send`, which never holds a message back, so an actor takes its
/// requests exactly in the order the registry routed them.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Deliver {
    pub req: Request,
    pub tx: oneshot::Sender<Result<Reply, SessionError>>,
}

impl Handler<Deliver> for SessionActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Deliver, _ctx: &mut Self::Context) -> Self::Result {
        self.last_used = Instant::now();
        let live = self.live.take();
        let mut claims = std::mem::take(&mut self.claims);
        let predecessor = self.predecessor.take();
        let (env, key, partition, projector) = (self.env.clone(), self.key.clone(), self.partition, self.projector.clone());
        let Deliver { req, tx } = msg;
        let fut = async move {
            if let Some(p) = predecessor {
                p.await;
            }
            let (live, reply) = process(&env, &key, partition, projector.as_ref(), live, &mut claims, req).await;
            (live, reply, claims)
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|(live, reply, claims), act, _| {
            act.live = live;
            act.claims = claims;
            act.last_used = Instant::now();
            let _ = tx.send(reply);
        })))
    }
}

type Outcome = (Option<Live>, Result<Reply, SessionError>);

async fn process(
    env: &Env,
    key: &SessionKey,
    partition: u32,
    projector: Option<&Projector>,
    live: Option<Live>,
    claims: &mut Claims,
    req: Request,
) -> Outcome {
    if Instant::now() >= req.deadline {
        return (live, Err(SessionError::Timeout));
    }
    let Some(epoch) = env.ownership.serving(partition) else {
        // Not ours (any more): whatever is in memory may be stale by now.
        return (None, Err(SessionError::NotOwner));
    };
    let mut live = match live {
        Some(live) if live.epoch == epoch => live,
        _ => match load(env, key, projector, epoch).await {
            Ok(live) => live,
            Err(e) => return (None, Err(e)),
        },
    };
    let reply = match req.op {
        Op::GetCreds => Ok(Reply::Creds { creds: live.st.creds().cloned(), seq: live.st.seq() }),
        Op::GetKeys { ty, ids } => SessionState::check_get(&env.limits, ids.len())
            .map(|()| Reply::Keys { values: live.st.get_keys(&ty, &ids), seq: live.st.seq() })
            .map_err(SessionError::from),
        Op::ListIds { ty, after, limit } => {
            let limit = limit.unwrap_or(env.limits.max_ids_per_call);
            SessionState::check_list(&env.limits, limit)
                .map(|()| {
                    let (ids, next) = live.st.list_ids(&ty, after.as_ref(), limit, crate::MAX_LIST_BYTES);
                    Reply::Ids { ids, next, seq: live.st.seq() }
                })
                .map_err(SessionError::from)
        }
        Op::Info => Ok(Reply::Info(live.st.info())),
        Op::Write { cmd, rid } => match claims.unclaimed_write(Instant::now()) {
            Ok(()) => write(env, key, projector, &mut live, cmd, rid, req.deadline).await,
            Err(wait) => {
                claim_event(ClaimEvent::HeldOff);
                Err(SessionError::Claimed { wait_ms: ceil_ms(wait) })
            }
        },
        Op::Claim { claim } => claim_op(env, partition, epoch, claims, claim, live.st.seq()),
        Op::ClaimedWrite { claim, cmd, rid } => match renew(env, partition, epoch, claims, &claim) {
            Ok(lease) => write(env, key, projector, &mut live, cmd, rid, req.deadline).await.map(|reply| match reply {
                Reply::Written { seq } => Reply::WrittenClaimed { seq, lease_ms: floor_ms(lease) },
                other => other,
            }),
            Err(e) => Err(e),
        },
        // A restore changes the session behind its claim holder's memory: like
        // an unclaimed write it supersedes the claim and applies only once the
        // holder's lease has run out (409 meanwhile; the tool retries). A dry
        // run writes nothing and waits for no one.
        Op::Restore(r) if r.dry_run => restore::restore(env, key, projector, &mut live, r, req.deadline).await,
        Op::Restore(r) => match claims.unclaimed_write(Instant::now()) {
            Ok(()) => restore::restore(env, key, projector, &mut live, r, req.deadline).await,
            Err(wait) => {
                claim_event(ClaimEvent::HeldOff);
                Err(SessionError::Claimed { wait_ms: ceil_ms(wait) })
            }
        },
    };
    // The answer leaves only while the lease still holds: after it, another
    // instance may already have changed the session.
    if !env.ownership.still_serving(partition, epoch) {
        let reply = match reply {
            Ok(Reply::Written { .. } | Reply::WrittenClaimed { .. } | Reply::Restored(_)) => {
                Err(SessionError::Unavailable("the session moved to another instance; retry with the same rid".into()))
            }
            Ok(_) => Err(SessionError::NotOwner),
            Err(e) => Err(e),
        };
        return (None, reply);
    }
    (Some(live), reply)
}

/// The lease a claim gets now: the configured one, cut to what is left of
/// this instance's partition lease, so that it ends before another instance
/// can serve the session (which knows no claim). `None`: not served now.
fn claim_lease(env: &Env, partition: u32, epoch: u64) -> Option<Duration> {
    env.ownership.serving_for(partition, epoch).map(|left| left.min(env.cfg.claim_lease()))
}

/// Renews `claim` for a renewal or a write carrying it; the lease given.
fn renew(env: &Env, partition: u32, epoch: u64, claims: &mut Claims, claim: &str) -> Result<Duration, SessionError> {
    let lease = claim_lease(env, partition, epoch).ok_or(SessionError::NotOwner)?;
    match claims.renew(claim, Instant::now(), lease, epoch) {
        Ok(()) => {
            claim_event(ClaimEvent::Renewed);
            Ok(lease)
        }
        Err(_) => {
            claim_event(ClaimEvent::Superseded);
            Err(SessionError::Superseded)
        }
    }
}

/// `session.claim`: a new claim (`claim: None`), granted unless another
/// claim's lease runs, or the renewal of `claim`.
fn claim_op(env: &Env, partition: u32, epoch: u64, claims: &mut Claims, claim: Option<String>, seq: u64) -> Result<Reply, SessionError> {
    if let Some(id) = claim {
        let lease = renew(env, partition, epoch, claims, &id)?;
        return Ok(Reply::Claim { claim: Some(id), lease_ms: floor_ms(lease), wait_ms: 0, seq });
    }
    let lease = claim_lease(env, partition, epoch).ok_or(SessionError::NotOwner)?;
    match claims.claim(Instant::now(), lease, epoch, || uuid::Uuid::new_v4().simple().to_string()) {
        Claimed::Granted(id) => {
            claim_event(ClaimEvent::Granted);
            Ok(Reply::Claim { claim: Some(id), lease_ms: floor_ms(lease), wait_ms: 0, seq })
        }
        Claimed::Wait(wait) => {
            claim_event(ClaimEvent::Waited);
            Ok(Reply::Claim { claim: None, lease_ms: 0, wait_ms: ceil_ms(wait), seq })
        }
    }
}

/// A lease in whole milliseconds, rounded down: the client's side of it.
fn floor_ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// A wait in whole milliseconds, rounded up.
fn ceil_ms(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000) as u64
}

async fn load(env: &Env, key: &SessionKey, projector: Option<&Projector>, epoch: u64) -> Result<Live, SessionError> {
    let mut rids = RecentRids::default();
    let loaded = crate::load::load_observed(&env.log, env.redis.as_ref(), key, &mut |seq, event| {
        if let Some(rid) = &event.rid {
            rids.record(rid, seq, event.at_ms);
        }
    })
    .await?;
    tracing::debug!(session = %key, seq = loaded.state.seq(), source = ?loaded.source, "session loaded");
    crate::stats::loaded(&loaded.source);
    if let (Some(p), Some(mode)) = (projector, loaded.repair) {
        p.snapshot(&loaded.state, mode);
    }
    let mut snap = SnapTrack::after_load(&loaded.source);
    snap.maybe_write(&env.cfg, &env.log, key, &loaded.state);
    Ok(Live { st: loaded.state, epoch, rids, snap })
}

/// Decides, appends, and applies one write. On a conflict the session is
/// brought up to the log and the command decided again: every write is a
/// blind "make it so", so deciding it against newer state is what the client
/// meant.
async fn write(
    env: &Env,
    key: &SessionKey,
    projector: Option<&Projector>,
    live: &mut Live,
    cmd: bstore_domain::Command,
    rid: Option<String>,
    deadline: Instant,
) -> Result<Reply, SessionError> {
    let window_ms = env.log.config().duplicate_window.as_millis() as u64;
    for _ in 0..=env.cfg.conflict_retries {
        if let Some(seq) = rid.as_deref().and_then(|r| live.rids.seq_of(r, now_ms(), window_ms)) {
            // A retry of a write the log already stored.
            return Ok(Reply::Written { seq });
        }
        let Some(event) = decide(&mut live.st, &cmd, &env.limits, rid.as_deref()).await? else {
            // Nothing to change — as far as this state knows. Acknowledge
            // only once the log confirms the state is current.
            let last = env.log.last_seq(key).await?;
            if last == live.st.seq() {
                return Ok(Reply::Written { seq: last });
            }
            resync(env, key, live, last).await?;
            continue;
        };
        match crate::stats::timed_append(&env.log, key, live.st.seq(), &event).await {
            Ok(appended) if appended.duplicate => {
                // A retry of a request the log already stored, which this
                // state has yet to see.
                if appended.seq > live.st.seq() {
                    catch_up(env, key, live).await?;
                }
                return Ok(Reply::Written { seq: appended.seq });
            }
            Ok(appended) => {
                // What the event touches as it was before, for the digest in
                // the Redis copy's manifest.
                let before = projector.map(|_| crate::projector::image(&live.st, &event));
                // The event was decided against this very state, so it fits.
                live.st.apply(appended.seq, &event).map_err(|e| SessionError::Unreadable(format!("{key}: {e}")))?;
                if let Some(rid) = &event.rid {
                    live.rids.record(rid, appended.seq, event.at_ms);
                }
                if let (Some(p), Some(before)) = (projector, before) {
                    p.after_write(before, &live.st, &event);
                }
                live.snap.record(event.value_bytes());
                live.snap.maybe_write(&env.cfg, &env.log, key, &live.st);
                return Ok(Reply::Written { seq: appended.seq });
            }
            Err(LogError::Conflict { expected }) => {
                tracing::info!(session = %key, expected, "write conflict; catching up with the log");
                let last = env.log.last_seq(key).await?;
                resync(env, key, live, last).await?;
                if Instant::now() >= deadline {
                    return Err(SessionError::Timeout);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SessionError::Conflict)
}

/// Commands carrying more value bytes than this are decided off the thread
/// that serves the other sessions: building the deltas of large rewritten
/// values is linear but not free, and nobody else should wait for it.
const OFF_THREAD_BYTES: usize = 128 << 10;

/// `SessionState::handle`, on a blocking-pool thread for large commands.
async fn decide(
    st: &mut SessionState,
    cmd: &bstore_domain::Command,
    limits: &Limits,
    rid: Option<&str>,
) -> Result<Option<bstore_domain::Event>, SessionError> {
    let (now, rid) = (now_ms(), rid.map(str::to_owned));
    if cmd.value_bytes() < OFF_THREAD_BYTES {
        return Ok(st.handle(cmd.clone(), limits, now, rid)?);
    }
    let (state, cmd, limits) = (std::mem::take(st), cmd.clone(), *limits);
    let (state, decided) = tokio::task::spawn_blocking(move || {
        let decided = state.handle(cmd, &limits, now, rid);
        (state, decided)
    })
    .await
    .map_err(|e| SessionError::Unavailable(format!("deciding a write failed: {e}")))?;
    *st = state;
    Ok(decided?)
}

/// Brings `live` to the log, whose last event of the session is `last`: the
/// events after the state's, or — when the state is ahead of the log — the
/// log alone, from scratch.
async fn resync(env: &Env, key: &SessionKey, live: &mut Live, last: u64) -> Result<(), SessionError> {
    if last < live.st.seq() {
        tracing::warn!(session = %key, state_seq = live.st.seq(), log_seq = last, "the session in memory is ahead of the log; reloading it from the log");
        let fresh = load(env, key, None, live.epoch).await?;
        *live = fresh;
        return Ok(());
    }
    catch_up(env, key, live).await
}

/// Applies every event after the state's sequence.
async fn catch_up(env: &Env, key: &SessionKey, live: &mut Live) -> Result<(), SessionError> {
    let rids = &mut live.rids;
    crate::load::replay_observed(&env.log, key, &mut live.st, &mut |seq, event| {
        if let Some(rid) = &event.rid {
            rids.record(rid, seq, event.at_ms);
        }
    })
    .await
    .map(|_| ())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Builds a predecessor future from the receiver a [`Passivate`] answers on.
pub(crate) fn predecessor(rx: oneshot::Receiver<()>) -> Predecessor {
    rx.map(|_| ()).boxed().shared()
}
