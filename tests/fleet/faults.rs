//! Redis stopped and restarted under both fault modes, Redis answering
//! after the sidecars' deadline, and a sidecar killed while it holds
//! leases.

use super::*;

async fn all_answer(bases: &[String], counts: &[usize]) -> Vec<(u16, Option<String>)> {
    let answers = flood(bases, counts, 4).await;
    // No request is left hanging and none sees a gateway failure.
    assert!(
        answers
            .iter()
            .all(|(s, _)| *s != 0 && *s != 500 && *s != 502),
        "{answers:?}"
    );
    answers
}

/// The fleet's use of the tenant's day window, as Redis holds it.
fn used_in_redis(url: &str, ns: &str) -> u64 {
    let mut c = redis(url);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:alpha:*:day:*"))
        .query(&mut c)
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let used: String = redis::cmd("HGET")
        .arg(&keys[0])
        .arg("u")
        .query(&mut c)
        .unwrap();
    used.split(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_mode_keeps_admitting_without_redis_and_reconciles_after() {
    let a = mock().await;
    let mut r = OwnRedis::start();
    let ns = namespace("local");
    let conf = fleet_config(
        &a,
        json!({"requests_per_day": 1000}),
        fleet_section(
            &r.url(),
            &ns,
            json!({"on_redis_down": "local", "expected_replicas": 2}),
        ),
    );
    let (mut procs, _dirs) = sidecars(&conf, 2);
    let bases: Vec<String> = procs.iter().map(|p| p.base.clone()).collect();
    let before = all_answer(&bases, &[20, 20]).await;
    assert_eq!(admitted(&before), 40);

    r.stop();
    let admin = procs[0].admin.clone();
    assert!(
        until(Duration::from_secs(5), || async {
            metric(&admin, "collie_fleet_redis_up", &[]).await == 0.0
        })
        .await
    );
    // Past the leases' ttl: each sidecar admits from its part of the limit.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let during = all_answer(&bases, &[30, 30]).await;
    assert_eq!(admitted(&during), 60, "{during:?}");
    let bound = metric(
        &admin,
        "collie_fleet_overshoot_bound",
        &[("tenant", "alpha"), ("window", "day.requests")],
    )
    .await;
    assert!(bound > 0.0, "the fallback's allowance is not exported");

    r.restart();
    for p in procs.iter() {
        let admin = p.admin.clone();
        assert!(
            until(Duration::from_secs(5), || async {
                metric(&admin, "collie_fleet_redis_up", &[]).await == 1.0
            })
            .await,
            "a sidecar did not reach Redis again"
        );
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Everything admitted while Redis was away is counted there now (the
    // leases that expired meanwhile were given back when their sidecars
    // reported).
    let url = r.url();
    assert!(
        until(Duration::from_secs(5), || async {
            used_in_redis(&url, &ns) == 100
        })
        .await,
        "Redis counts {} of the 100 requests admitted",
        used_in_redis(&url, &ns)
    );
    let after = all_answer(&bases, &[5, 5]).await;
    assert_eq!(admitted(&after), 10);
    stop_all(&mut procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_redis_answers_too_late_count_each_request_once() {
    let a = mock().await;
    let relay = SlowRelay::start("127.0.0.1:6379", Duration::from_millis(1_000)).await;
    let ns = namespace("late");
    let lease =
        json!({"interval": "200ms", "ttl": "3s", "call_timeout": "300ms", "top_up_wait": "2s"});
    let conf = fleet_config(
        &a,
        json!({"requests_per_day": 1000}),
        fleet_section(
            &relay.url(),
            &ns,
            json!({"on_redis_down": "local", "lease": lease}),
        ),
    );
    let (mut procs, _dirs) = sidecars(&conf, 1);
    let bases = vec![procs[0].base.clone()];
    let admin = procs[0].admin.clone();
    // Redis comes to count `n` requests within a few intervals.
    let counts = |n: u64| {
        let ns = ns.clone();
        async move {
            let reached = until(Duration::from_secs(5), || async {
                used_in_redis(REDIS_URL, &ns) == n
            })
            .await;
            assert!(
                reached,
                "Redis counts {} of {n}",
                used_in_redis(REDIS_URL, &ns)
            );
        }
    };
    assert_eq!(admitted(&all_answer(&bases, &[10]).await), 10);
    counts(10).await;

    // Redis applies every call but answers after the deadline: the sidecar
    // hears nothing and reports the same use again at each refresh.
    relay.set_slow(true);
    assert!(
        until(Duration::from_secs(5), || async {
            metric(&admin, "collie_fleet_redis_up", &[]).await == 0.0
        })
        .await
    );
    assert_eq!(admitted(&all_answer(&bases, &[10]).await), 10);
    // A late answer fails the call (the deadline, or the connection's
    // response timeout of the same length).
    let failed = || async {
        let calls = "collie_fleet_redis_calls_total";
        metric(&admin, calls, &[("result", "timeout")]).await
            + metric(&admin, calls, &[("result", "error")]).await
    };
    let before = failed().await;
    assert!(
        until(Duration::from_secs(5), || async {
            failed().await >= before + 2.0
        })
        .await,
        "the sidecar made no more calls while Redis was slow"
    );
    relay.set_slow(false);
    assert!(
        until(Duration::from_secs(5), || async {
            metric(&admin, "collie_fleet_redis_up", &[]).await == 1.0
        })
        .await,
        "the sidecar did not hear from Redis again"
    );
    // Every call Redis applied is in its count now: each request once.
    assert_eq!(used_in_redis(REDIS_URL, &ns), 20);
    assert_eq!(admitted(&all_answer(&bases, &[5]).await), 5);
    counts(25).await;
    stop_all(&mut procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_mode_refuses_with_503_once_the_leases_end_and_recovers() {
    let a = mock().await;
    let mut r = OwnRedis::start();
    let ns = namespace("closed");
    let conf = fleet_config(
        &a,
        json!({"requests_per_day": 1000}),
        fleet_section(&r.url(), &ns, json!({"on_redis_down": "closed"})),
    );
    let (mut procs, _dirs) = sidecars(&conf, 2);
    let bases: Vec<String> = procs.iter().map(|p| p.base.clone()).collect();
    assert_eq!(admitted(&all_answer(&bases, &[10, 10]).await), 20);

    r.stop();
    // Past the leases' ttl (2 s) and one more interval.
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    let during = all_answer(&bases, &[10, 10]).await;
    assert!(
        during
            .iter()
            .all(|(s, c)| *s == 503 && c.as_deref() == Some("quota_unavailable")),
        "{during:?}"
    );

    r.restart();
    // Recovery within two lease intervals of Redis answering (plus the
    // client's reconnect).
    let (b0, b1) = (bases[0].clone(), bases[1].clone());
    assert!(
        until(Duration::from_secs(5), || async {
            let client = reqwest::Client::new();
            ask(&client, &b0).await.0 == 200 && ask(&client, &b1).await.0 == 200
        })
        .await,
        "the sidecars did not admit again after Redis came back"
    );
    stop_all(&mut procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_sidecar_loses_at_most_its_leases() {
    let a = mock().await;
    let ns = namespace("kill");
    let conf = fleet_config(
        &a,
        json!({"requests_per_day": 100}),
        fleet_section(REDIS_URL, &ns, json!({})),
    );
    redis(REDIS_URL);
    let (mut procs, _dirs) = sidecars(&conf, 2);
    let bases: Vec<String> = procs.iter().map(|p| p.base.clone()).collect();
    let first = flood(&bases[..1], &[30], 8).await;
    let admitted_by_dead = admitted(&first);
    let lease = metric(
        &procs[0].admin,
        "collie_fleet_lease",
        &[("tenant", "alpha"), ("window", "day.requests")],
    )
    .await as usize;
    procs[0].child.kill().unwrap();
    let _ = procs[0].child.wait();

    // The survivor takes what is left, at first around the dead sidecar's
    // lease, then (once it expired: 2 s) all but what it may have spent.
    let mut by_survivor = 0;
    for _ in 0..8 {
        by_survivor += admitted(&flood(&bases[1..], &[40], 8).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let total = admitted_by_dead + by_survivor;
    eprintln!(
        "kill -9: {admitted_by_dead} admitted by the killed sidecar (lease {lease}), {by_survivor} by the survivor"
    );
    assert!(
        total <= 100,
        "{admitted_by_dead} + {by_survivor} admitted of 100"
    );
    let lost = 100 - total;
    assert!(
        lost <= lease,
        "{lost} of the budget lost, more than the dead sidecar's lease of {lease}"
    );
    terminate(&mut procs[1].child);
}
