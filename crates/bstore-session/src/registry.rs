//! Which actor serves which session.
//!
//! **Invariant: one actor per session per instance, and hand-overs in
//! order.** The registry is the only one that starts or stops session
//! actors. To stop one (least recently used past `max_active`, idle, or its
//! partition given up) it removes it from the map and sends it
//! [`Passivate`] — after every request it routed there, since requests go
//! with `do_send`, in routing order. A request for that session arriving
//! meanwhile starts a new actor at once, but that actor waits for its
//! predecessor to have stopped before it loads anything: no request of a
//! session runs on two actors, none is reordered, none is dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::prelude::*;
use bstore_cluster::Ownership;
use bstore_domain::{Limits, SessionKey};
use bstore_log::EventLog;
use bstore_redis::RedisProjection;
use tokio::sync::oneshot;

use crate::actor::{Deliver, Env, Idle, Passivate, Predecessor, SessionActor, predecessor};
use crate::{Reply, Request, SessionConfig, SessionError};

struct Entry {
    addr: Addr<SessionActor>,
    generation: u64,
    /// Position in the least-recently-used order.
    tick: u64,
}

/// Maps sessions to their actors, starts actors on demand on a pool of
/// arbiters, and keeps the number alive under `max_active`.
pub struct Registry {
    env: Arc<Env>,
    actors: HashMap<SessionKey, Entry>,
    /// Actors told to stop, until they have: a new actor of the same
    /// session waits for its predecessor.
    retiring: HashMap<SessionKey, Predecessor>,
    /// Least recently used first.
    lru: BTreeMap<u64, SessionKey>,
    tick: u64,
    generation: u64,
    arbiters: Vec<Arbiter>,
    next_arbiter: usize,
}

/// A routed request and where its answer goes.
struct Route {
    req: Request,
    tx: oneshot::Sender<Result<Reply, SessionError>>,
}

impl Message for Route {
    type Result = ();
}

impl Registry {
    fn route(&mut self, key: &SessionKey, ctx: &mut Context<Self>) -> &Entry {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.actors.get_mut(key) {
            self.lru.remove(&entry.tick);
            entry.tick = tick;
            self.lru.insert(tick, key.clone());
            return &self.actors[key];
        }
        while self.actors.len() >= self.env.cfg.max_active.max(1) {
            let Some((_, victim)) = self.lru.pop_first() else { break };
            tracing::debug!(session = %victim, "passivating least recently used session");
            self.retire(&victim);
        }
        self.retiring.retain(|_, p| p.peek().is_none());
        let before = self.retiring.get(key).cloned();
        self.generation += 1;
        let (k, env, generation, me) = (key.clone(), self.env.clone(), self.generation, ctx.address().recipient());
        let addr = if self.arbiters.is_empty() {
            // On the registry's own thread, beside the NATS connection.
            SessionActor::new(k, generation, env, before, me).start()
        } else {
            let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
            self.next_arbiter += 1;
            SessionActor::start_in_arbiter(&arbiter.handle(), move |_| SessionActor::new(k, generation, env, before, me))
        };
        self.actors.insert(key.clone(), Entry { addr, generation, tick });
        self.lru.insert(tick, key.clone());
        &self.actors[key]
    }

    /// Stops `key`'s actor after the requests already routed to it.
    fn retire(&mut self, key: &SessionKey) -> Option<Predecessor> {
        self.retire_as(key, true)
    }

    /// [`Registry::retire`], projecting the state a last time or not.
    fn retire_as(&mut self, key: &SessionKey, project: bool) -> Option<Predecessor> {
        let entry = self.actors.remove(key)?;
        self.lru.remove(&entry.tick);
        let (done, stopped) = oneshot::channel();
        entry.addr.do_send(Passivate { done, project });
        let stopped = predecessor(stopped);
        // If an earlier actor of the session is still stopping, this one
        // waited for it; waiting for this one covers both.
        self.retiring.insert(key.clone(), stopped.clone());
        Some(stopped)
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.env.cfg.idle_timeout() / 2, |act, _| act.retiring.retain(|_, p| p.peek().is_none()));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

impl Handler<Route> for Registry {
    type Result = ();

    fn handle(&mut self, Route { req, tx }: Route, ctx: &mut Self::Context) {
        let key = req.key.clone();
        self.route(&key, ctx).addr.do_send(Deliver { req, tx });
    }
}

impl Handler<Idle> for Registry {
    type Result = ();

    fn handle(&mut self, idle: Idle, _: &mut Self::Context) {
        // Only the actor that reported it: a newer actor of the session may
        // have been started since.
        if self.actors.get(&idle.key).is_some_and(|e| e.generation == idle.generation) {
            tracing::debug!(session = %idle.key, "stopping idle session");
            self.retire(&idle.key);
        }
    }
}

/// Stops every actor of one partition; answers once they have all stopped.
struct DropPartition(u32);

impl Message for DropPartition {
    type Result = Vec<Predecessor>;
}

impl Handler<DropPartition> for Registry {
    type Result = MessageResult<DropPartition>;

    fn handle(&mut self, DropPartition(p): DropPartition, _: &mut Self::Context) -> Self::Result {
        let keys: Vec<SessionKey> = self.actors.keys().filter(|k| self.env.ownership.partition(k) == p).cloned().collect();
        let mut waits: Vec<Predecessor> = keys.iter().filter_map(|k| self.retire(k)).collect();
        // Actors of the partition retired earlier may still be stopping.
        waits.extend(self.retiring.iter().filter(|(k, _)| self.env.ownership.partition(k) == p).map(|(_, w)| w.clone()));
        MessageResult(waits)
    }
}

/// Stops one session's actor without projecting its state: the session
/// was erased. Answers once it has stopped.
struct Forget(SessionKey);

impl Message for Forget {
    type Result = Option<Predecessor>;
}

impl Handler<Forget> for Registry {
    type Result = MessageResult<Forget>;

    fn handle(&mut self, Forget(key): Forget, _: &mut Self::Context) -> Self::Result {
        let stopped = self.retire_as(&key, false).or_else(|| self.retiring.get(&key).cloned());
        MessageResult(stopped)
    }
}

/// Sessions in the registry alive now.
#[derive(Message)]
#[rtype(result = "usize")]
struct Count;

impl Handler<Count> for Registry {
    type Result = usize;

    fn handle(&mut self, _: Count, _: &mut Self::Context) -> usize {
        self.actors.len()
    }
}

/// The way in: a cheap handle that routes requests to session actors.
#[derive(Clone)]
pub struct Sessions {
    registry: Addr<Registry>,
    timeout: std::time::Duration,
    ownership: Ownership,
}

impl Sessions {
    /// Starts the registry and its arbiters, serving every session (no
    /// other instance). Must run inside an actix system.
    pub fn start(log: EventLog, limits: Limits, cfg: SessionConfig) -> Self {
        let ownership = Ownership::sole(&bstore_cluster::ClusterConfig::default());
        Self::start_with(log, None, ownership, limits, cfg)
    }

    /// Like [`Sessions::start`], serving the sessions whose partitions
    /// `ownership` holds, loading from and projecting into `redis` when it
    /// is given.
    pub fn start_with(log: EventLog, redis: Option<RedisProjection>, ownership: Ownership, limits: Limits, cfg: SessionConfig) -> Self {
        let timeout = cfg.request_timeout();
        let arbiters = (0..cfg.workers).map(|_| Arbiter::new()).collect();
        let env = Arc::new(Env { log, redis, ownership: ownership.clone(), limits, cfg });
        let registry = Registry {
            env,
            actors: HashMap::new(),
            retiring: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            generation: 0,
            arbiters,
            next_arbiter: 0,
        }
        .start();
        Self { registry, timeout, ownership }
    }

    /// The ownership gate the sessions are served under.
    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    /// Routes `req` to its session and waits for the answer, at most until
    /// the request's deadline.
    pub async fn call(&self, req: Request) -> Result<Reply, SessionError> {
        let wait = req.deadline.saturating_duration_since(std::time::Instant::now());
        let (tx, rx) = oneshot::channel();
        // `do_send` queues even past the mailbox's nominal capacity, so
        // requests reach the registry in the order they were made. If the
        // registry has stopped, `tx` is dropped and the answer says so.
        self.registry.do_send(Route { req, tx });
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(reply)) => reply,
            // The registry or the actor went away without answering (only
            // at shutdown, or on a panic): the request may or may not have
            // run, so the client retries with the same rid.
            Ok(Err(_)) => Err(SessionError::Unavailable("the session actor stopped".into())),
            Err(_) => Err(SessionError::Timeout),
        }
    }

    /// Stops every session of partition `p` and waits until they have all
    /// stopped (their requests in flight answered).
    pub async fn drop_partition(&self, p: u32) {
        if let Ok(waits) = self.registry.send(DropPartition(p)).await {
            futures_util::future::join_all(waits).await;
        }
    }

    /// The deadline a new request gets.
    pub fn deadline(&self) -> std::time::Instant {
        std::time::Instant::now() + self.timeout
    }

    /// Stops `key`'s actor (if it has one) after the requests already
    /// routed to it, dropping its state unprojected, and waits for it: an
    /// erased session must not stay in memory. The next request loads it
    /// from the log again.
    pub async fn forget(&self, key: &SessionKey) {
        if let Ok(Some(stopped)) = self.registry.send(Forget(key.clone())).await {
            stopped.await;
        }
    }

    /// How many session actors are alive.
    pub async fn active(&self) -> usize {
        self.registry.send(Count).await.unwrap_or(0)
    }
}
