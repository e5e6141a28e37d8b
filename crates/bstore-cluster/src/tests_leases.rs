//! The lease keeper against a real nats-server: partitions spread and never
//! served twice, a graceful stop hands over at once, and a holder cut off
//! from NATS stops serving by its own clock before anyone else may start.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bstore_testkit::NatsServer;

use crate::{BoxFuture, ClusterConfig, Handover, Leases, Ownership};

#[derive(Default)]
struct Recorder {
    acquired: Mutex<Vec<u32>>,
    released: Mutex<Vec<u32>>,
}

impl Handover for Recorder {
    fn acquired(&self, p: u32) -> BoxFuture {
        self.acquired.lock().unwrap().push(p);
        Box::pin(async {})
    }

    fn release(&self, p: u32) -> BoxFuture {
        self.released.lock().unwrap().push(p);
        Box::pin(async {})
    }
}

fn cfg() -> ClusterConfig {
    ClusterConfig {
        partitions: 16,
        lease_ttl: Duration::from_secs(2),
        renew_interval: Duration::from_millis(300),
        margin: Duration::from_millis(600),
        ..Default::default()
    }
}

struct Member {
    ownership: Ownership,
    leases: Leases,
    recorder: Arc<Recorder>,
    client: async_nats::Client,
}

async fn member(nats: &NatsServer, name: &str) -> Member {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let ownership = Ownership::new(&cfg(), name);
    let recorder = Arc::new(Recorder::default());
    let leases =
        Leases::start(async_nats::jetstream::new(client.clone()), cfg(), 1, ownership.clone(), recorder.clone(), false).await.unwrap();
    Member { ownership, leases, recorder, client }
}

fn served(o: &Ownership) -> BTreeSet<u32> {
    o.served().into_iter().collect()
}

/// Samples both gates until `until` holds or `limit` passes, failing if a
/// partition is ever served by both.
async fn watch_both(a: &Ownership, b: &Ownership, limit: Duration, until: impl Fn(&BTreeSet<u32>, &BTreeSet<u32>) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let (sa, sb) = (served(a), served(b));
        let both: Vec<_> = sa.intersection(&sb).collect();
        assert!(both.is_empty(), "partitions {both:?} served by two instances at once");
        if until(&sa, &sb) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "not reached within {limit:?}: a serves {sa:?}, b serves {sb:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn two_instances_split_the_partitions_and_never_serve_one_twice() {
    let nats = NatsServer::start();
    let a = member(&nats, "a").await;
    assert_eq!(served(&a.ownership).len(), 16, "alone, an instance takes every partition in its first round");
    let b = member(&nats, "b").await;
    watch_both(&a.ownership, &b.ownership, Duration::from_secs(20), |sa, sb| sa.len() == 8 && sb.len() == 8).await;
    // What a gave up it drained first.
    let released: BTreeSet<u32> = a.recorder.released.lock().unwrap().iter().copied().collect();
    assert_eq!(released.len(), 8, "a handed over exactly what b took");
    assert!(released.is_disjoint(&served(&a.ownership)));
    // Stable: nothing moves any more.
    let before = (served(&a.ownership), served(&b.ownership));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((served(&a.ownership), served(&b.ownership)), before);
    a.leases.stop().await;
    b.leases.stop().await;
}

#[tokio::test]
async fn a_stopped_instance_hands_its_partitions_over_at_once() {
    let nats = NatsServer::start();
    let a = member(&nats, "a").await;
    let b = member(&nats, "b").await;
    watch_both(&a.ownership, &b.ownership, Duration::from_secs(20), |sa, sb| sa.len() == 8 && sb.len() == 8).await;
    let stopping = Instant::now();
    a.leases.stop().await;
    assert!(served(&a.ownership).is_empty(), "a stopped instance serves nothing");
    let took = watch_both(&a.ownership, &b.ownership, Duration::from_secs(10), |_, sb| sb.len() == 16).await + stopping.elapsed();
    // Well under the lease time: the deleted leases are seen at once.
    assert!(took < cfg().lease_ttl, "the hand-over waited for the leases to expire ({took:?})");
    b.leases.stop().await;
}

#[tokio::test]
async fn a_holder_cut_off_from_nats_stops_serving_before_anyone_else_starts() {
    let nats = NatsServer::start();
    let a = member(&nats, "a").await;
    let b = member(&nats, "b").await;
    watch_both(&a.ownership, &b.ownership, Duration::from_secs(20), |sa, sb| sa.len() == 8 && sb.len() == 8).await;
    let a_had = served(&a.ownership);
    // a can no longer reach the server (its renewals fail); it is not
    // stopped and deletes nothing.
    a.client.drain().await.unwrap();
    let cut = Instant::now();
    // a's gates close by a's own clock within lease_ttl − margin of its last
    // renewal; b may take them only after they expire on the server. No
    // sample may find a partition served by both.
    watch_both(&a.ownership, &b.ownership, Duration::from_secs(20), |sa, sb| sa.is_empty() && sb.len() == 16).await;
    let moved = cut.elapsed();
    assert!(moved >= cfg().lease_ttl - cfg().renew_interval, "b took a's partitions before their leases could expire ({moved:?})");
    let released: BTreeSet<u32> = a.recorder.released.lock().unwrap().iter().copied().collect();
    assert!(a_had.is_subset(&released), "a dropped the sessions of every partition it lost");
    b.leases.stop().await;
    drop(a.leases);
}
