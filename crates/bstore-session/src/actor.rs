//! One session's actor.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use bstore_domain::{Limits, SessionKey, SessionState};
use bstore_log::{EventLog, LogError};

use crate::{Op, Reply, Request, SessionConfig, SessionError};

/// What every session actor shares: the log, the limits, the settings.
pub(crate) struct Env {
    pub log: EventLog,
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
}

impl SessionActor {
    pub(crate) fn new(key: SessionKey, env: Arc<Env>) -> Self {
        Self { key, env, state: None, last_used: Instant::now() }
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let idle = self.env.cfg.idle_timeout();
        ctx.run_interval(idle / 4, move |act, ctx| {
            if act.last_used.elapsed() >= idle {
                tracing::debug!(session = %act.key, "stopping idle session");
                ctx.stop();
            }
        });
    }
}

/// Asks an actor to stop once the requests already in its mailbox are done.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Passivate;

impl Handler<Passivate> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Passivate, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Request> for SessionActor {
    type Result = AtomicResponse<Self, Result<Reply, SessionError>>;

    fn handle(&mut self, req: Request, _ctx: &mut Self::Context) -> Self::Result {
        self.last_used = Instant::now();
        let state = self.state.take();
        let (env, key) = (self.env.clone(), self.key.clone());
        let fut = async move { process(&env, &key, state, req).await };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|(state, reply), act, _| {
            act.state = state;
            act.last_used = Instant::now();
            reply
        })))
    }
}

type Outcome = (Option<SessionState>, Result<Reply, SessionError>);

async fn process(env: &Env, key: &SessionKey, state: Option<SessionState>, req: Request) -> Outcome {
    if Instant::now() >= req.deadline {
        return (state, Err(SessionError::Timeout));
    }
    let mut st = match state {
        Some(st) => st,
        None => match load(env, key).await {
            Ok(st) => st,
            Err(e) => return (None, Err(e)),
        },
    };
    let reply = match req.op {
        Op::GetCreds => Ok(Reply::Creds { creds: st.creds().cloned(), seq: st.seq() }),
        Op::GetKeys { ty, ids } => SessionState::check_get(&env.limits, ids.len())
            .map(|()| Reply::Keys { values: st.get_keys(&ty, &ids), seq: st.seq() })
            .map_err(SessionError::from),
        Op::Info => Ok(Reply::Info(st.info())),
        Op::Write { cmd, rid } => write(env, key, &mut st, cmd, rid, req.deadline).await,
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
                st.apply(appended.seq, &event);
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

async fn load(env: &Env, key: &SessionKey) -> Result<SessionState, SessionError> {
    let mut st = SessionState::default();
    catch_up(env, key, &mut st).await?;
    tracing::debug!(session = %key, seq = st.seq(), "session loaded");
    Ok(st)
}

/// Applies every event after the state's sequence.
async fn catch_up(env: &Env, key: &SessionKey, st: &mut SessionState) -> Result<(), SessionError> {
    let from = st.seq();
    env.log
        .replay(key, from, |seq, event| {
            st.apply(seq, &event);
        })
        .await?;
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
