//! One session's actor.
//!
//! The state lives here between requests; a request moves it into its
//! future, which loads it first if needed (see [`crate::load`]), and gives it
//! back when done. After each append the log acknowledged, the actor hands
//! the event to its [`Projector`], which updates Redis off the reply path.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use bstore_domain::{Limits, SessionKey, SessionState};
use bstore_log::{EventLog, LogError};
use bstore_redis::RedisProjection;

use crate::projector::Projector;
use crate::{Op, Reply, Request, SessionConfig, SessionError};

/// What every session actor shares: the log, the Redis projection (if
/// configured), the limits, the settings.
pub(crate) struct Env {
    pub log: EventLog,
    pub redis: Option<RedisProjection>,
    pub limits: Limits,
    pub cfg: SessionConfig,
}

/// Owns one session's state and serializes everything done to it.
pub struct SessionActor {
    key: SessionKey,
    env: Arc<Env>,
    /// `None` until loaded, and again after a load failed (the next request
    /// tries again). While a request is processed the state is moved into
    /// its future; the atomic response guarantees nobody looks meanwhile.
    state: Option<SessionState>,
    last_used: Instant,
    /// The Redis projection queue, started with the actor when Redis is
    /// configured.
    projector: Option<Projector>,
}

impl SessionActor {
    pub(crate) fn new(key: SessionKey, env: Arc<Env>) -> Self {
        Self { key, env, state: None, last_used: Instant::now(), projector: None }
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
                if let (Some(p), Some(st)) = (&act.projector, &act.state) {
                    p.catch_up(st);
                }
            });
        }
        let idle = self.env.cfg.idle_timeout();
        ctx.run_interval(idle / 4, move |act, ctx| {
            if act.last_used.elapsed() >= idle {
                tracing::debug!(session = %act.key, "stopping idle session");
                act.final_catch_up();
                ctx.stop();
            }
        });
    }
}

/// Asks an actor to stop once the requests already in its mailbox are done.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Passivate;

impl SessionActor {
    /// Last chance to bring a stale Redis copy up to date: the projection
    /// task outlives the actor until its queue is drained.
    fn final_catch_up(&self) {
        if let (Some(p), Some(st)) = (&self.projector, &self.state) {
            p.catch_up(st);
        }
    }
}

impl Handler<Passivate> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Passivate, ctx: &mut Self::Context) {
        self.final_catch_up();
        ctx.stop();
    }
}

impl Handler<Request> for SessionActor {
    type Result = AtomicResponse<Self, Result<Reply, SessionError>>;

    fn handle(&mut self, req: Request, _ctx: &mut Self::Context) -> Self::Result {
        self.last_used = Instant::now();
        let state = self.state.take();
        let (env, key, projector) = (self.env.clone(), self.key.clone(), self.projector.clone());
        let fut = async move { process(&env, &key, projector.as_ref(), state, req).await };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|(state, reply), act, _| {
            act.state = state;
            act.last_used = Instant::now();
            reply
        })))
    }
}

type Outcome = (Option<SessionState>, Result<Reply, SessionError>);

async fn process(env: &Env, key: &SessionKey, projector: Option<&Projector>, state: Option<SessionState>, req: Request) -> Outcome {
    if Instant::now() >= req.deadline {
        return (state, Err(SessionError::Timeout));
    }
    let mut st = match state {
        Some(st) => st,
        None => match crate::load::load(&env.log, env.redis.as_ref(), key).await {
            Ok(loaded) => {
                tracing::debug!(session = %key, seq = loaded.state.seq(), source = ?loaded.source, "session loaded");
                if let (Some(p), Some(mode)) = (projector, loaded.repair) {
                    p.snapshot(&loaded.state, mode);
                }
                loaded.state
            }
            Err(e) => return (None, Err(e)),
        },
    };
    let reply = match req.op {
        Op::GetCreds => Ok(Reply::Creds { creds: st.creds().cloned(), seq: st.seq() }),
        Op::GetKeys { ty, ids } => SessionState::check_get(&env.limits, ids.len())
            .map(|()| Reply::Keys { values: st.get_keys(&ty, &ids), seq: st.seq() })
            .map_err(SessionError::from),
        Op::Info => Ok(Reply::Info(st.info())),
        Op::Write { cmd, rid } => write(env, key, projector, &mut st, cmd, rid, req.deadline).await,
    };
    (Some(st), reply)
}

/// Decides, appends, and applies one write. On a conflict the session is
/// brought up to the log and the command decided again: every write is a
/// blind "make it so", so deciding it against newer state is what the client
/// meant.
async fn write(
    env: &Env,
    key: &SessionKey,
    projector: Option<&Projector>,
    st: &mut SessionState,
    cmd: bstore_domain::Command,
    rid: Option<String>,
    deadline: Instant,
) -> Result<Reply, SessionError> {
    for _ in 0..=env.cfg.conflict_retries {
        let Some(event) = st.handle(cmd.clone(), &env.limits, now_ms(), rid.clone())? else {
            return Ok(Reply::Written { seq: st.seq() });
        };
        match env.log.append(key, st.seq(), &event).await {
            Ok(appended) if appended.duplicate => {
                // A retry of a request the log already stored. If another
                // instance stored it, this actor has yet to see it.
                if appended.seq > st.seq() {
                    catch_up(env, key, st).await?;
                }
                return Ok(Reply::Written { seq: appended.seq });
            }
            Ok(appended) => {
                let prev = st.seq();
                // The event was decided against this very state, so it fits.
                st.apply(appended.seq, &event).map_err(|e| SessionError::Unreadable(format!("{key}: {e}")))?;
                if let Some(p) = projector {
                    p.after_write(prev, st, &event);
                }
                return Ok(Reply::Written { seq: appended.seq });
            }
            Err(LogError::Conflict { expected }) => {
                tracing::info!(session = %key, expected, "write conflict; catching up with the log");
                catch_up(env, key, st).await?;
                if Instant::now() >= deadline {
                    return Err(SessionError::Timeout);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SessionError::Conflict)
}

/// Applies every event after the state's sequence.
async fn catch_up(env: &Env, key: &SessionKey, st: &mut SessionState) -> Result<(), SessionError> {
    crate::load::replay_into(&env.log, key, st).await.map(|_| ())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
