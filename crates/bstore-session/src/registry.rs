//! Which actor serves which session.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::prelude::*;
use bstore_domain::{Limits, SessionKey};
use bstore_log::EventLog;
use bstore_redis::RedisProjection;

use crate::actor::{Env, Passivate, SessionActor};
use crate::{Reply, Request, SessionConfig, SessionError};

struct Entry {
    addr: Addr<SessionActor>,
    /// Position in the least-recently-used order.
    tick: u64,
}

/// Maps sessions to their actors, starts actors on demand on a pool of
/// arbiters, and keeps the number alive under `max_active`.
pub struct Registry {
    env: Arc<Env>,
    actors: HashMap<SessionKey, Entry>,
    /// Least recently used first.
    lru: BTreeMap<u64, SessionKey>,
    tick: u64,
    arbiters: Vec<Arbiter>,
    next_arbiter: usize,
}

/// A routed request; `retried` marks the second attempt after the first
/// actor had stopped before it could take the request.
struct Route {
    req: Request,
    retried: bool,
}

impl Message for Route {
    type Result = Result<Reply, SessionError>;
}

impl Registry {
    fn lookup(&mut self, key: &SessionKey) -> Addr<SessionActor> {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.actors.get_mut(key) {
            if entry.addr.connected() {
                self.lru.remove(&entry.tick);
                entry.tick = tick;
                self.lru.insert(tick, key.clone());
                return entry.addr.clone();
            }
            self.lru.remove(&entry.tick);
            self.actors.remove(key);
        }
        while self.actors.len() >= self.env.cfg.max_active.max(1) {
            let Some((_, victim)) = self.lru.pop_first() else { break };
            if let Some(entry) = self.actors.remove(&victim) {
                tracing::debug!(session = %victim, "passivating least recently used session");
                entry.addr.do_send(Passivate);
            }
        }
        let (k, env) = (key.clone(), self.env.clone());
        let addr = if self.arbiters.is_empty() {
            // On the registry's own thread, beside the NATS connection.
            SessionActor::new(k, env).start()
        } else {
            let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
            self.next_arbiter += 1;
            SessionActor::start_in_arbiter(&arbiter.handle(), move |_| SessionActor::new(k, env))
        };
        self.actors.insert(key.clone(), Entry { addr: addr.clone(), tick });
        self.lru.insert(tick, key.clone());
        addr
    }

    /// Drops entries of actors that stopped on their own (idle).
    fn prune(&mut self) {
        let lru = &mut self.lru;
        self.actors.retain(|_, e| {
            let alive = e.addr.connected();
            if !alive {
                lru.remove(&e.tick);
            }
            alive
        });
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.env.cfg.idle_timeout() / 2, |act, _| act.prune());
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

impl Handler<Route> for Registry {
    type Result = ResponseFuture<Result<Reply, SessionError>>;

    fn handle(&mut self, route: Route, ctx: &mut Self::Context) -> Self::Result {
        let addr = self.lookup(&route.req.key);
        let me = ctx.address();
        Box::pin(async move {
            let Route { req, retried } = route;
            match addr.send(req.clone()).await {
                Ok(reply) => reply,
                // The actor stopped (idle or evicted) before taking the
                // request, so it was not applied: start a fresh one, once.
                Err(MailboxError::Closed) if !retried => me
                    .send(Route { req, retried: true })
                    .await
                    .unwrap_or_else(|_| Err(SessionError::Unavailable("the session registry stopped".into()))),
                Err(MailboxError::Closed) => Err(SessionError::Unavailable("the session actor stopped".into())),
                Err(MailboxError::Timeout) => Err(SessionError::Timeout),
            }
        })
    }
}

/// Sessions in the registry alive now.
#[derive(Message)]
#[rtype(result = "usize")]
struct Count;

impl Handler<Count> for Registry {
    type Result = usize;

    fn handle(&mut self, _: Count, _: &mut Self::Context) -> usize {
        self.prune();
        self.actors.len()
    }
}

/// The way in: a cheap handle that routes requests to session actors.
#[derive(Clone)]
pub struct Sessions {
    registry: Addr<Registry>,
    timeout: std::time::Duration,
}

impl Sessions {
    /// Starts the registry and its arbiters. Must run inside an actix system.
    pub fn start(log: EventLog, limits: Limits, cfg: SessionConfig) -> Self {
        Self::start_with(log, None, limits, cfg)
    }

    /// Like [`Sessions::start`], with sessions loading from and projecting
    /// into `redis` when it is given.
    pub fn start_with(log: EventLog, redis: Option<RedisProjection>, limits: Limits, cfg: SessionConfig) -> Self {
        let timeout = cfg.request_timeout();
        let arbiters = (0..cfg.workers).map(|_| Arbiter::new()).collect();
        let env = Arc::new(Env { log, redis, limits, cfg });
        let registry = Registry { env, actors: HashMap::new(), lru: BTreeMap::new(), tick: 0, arbiters, next_arbiter: 0 }.start();
        Self { registry, timeout }
    }

    /// Routes `req` to its session and waits for the answer, at most until
    /// the request's deadline.
    pub async fn call(&self, req: Request) -> Result<Reply, SessionError> {
        let wait = req.deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(wait, self.registry.send(Route { req, retried: false })).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(SessionError::Unavailable("the session registry stopped".into())),
            Err(_) => Err(SessionError::Timeout),
        }
    }

    /// The deadline a new request gets.
    pub fn deadline(&self) -> std::time::Instant {
        std::time::Instant::now() + self.timeout
    }

    /// How many session actors are alive.
    pub async fn active(&self) -> usize {
        self.registry.send(Count).await.unwrap_or(0)
    }
}
