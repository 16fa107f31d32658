//! What the fleet shares besides tenants' quotas: a provider key's own
//! per-minute limit, and a provider's `Retry-After`.

use super::*;
use collie_mock::Behavior;

/// Model `gpt` falls back from pool `pa` (mock `a`) to `pb` (mock `b`);
/// `a`'s key is limited to `a_rpm` requests per minute when given.
fn two_deployments(a: &MockServer, b: &MockServer, a_rpm: Option<u64>, fleet: Value) -> Conf {
    let off = json!({"probe": "off"});
    let mut da = Deployment::on("a", a, "gpt-a")
        .key("KEY_A")
        .health(off.clone());
    if let Some(r) = a_rpm {
        da = da.set("rpm", r);
    }
    Conf::new()
        .tenant(Tenant::alpha())
        .model(Model::new("gpt", &["pa", "pb"]))
        .pool(Pool::new("pa", &["a"]))
        .pool(Pool::new("pb", &["b"]))
        .deployment(da)
        .deployment(Deployment::on("b", b, "gpt-b").key("KEY_B").health(off))
        .set("fleet", fleet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_keys_rpm_is_shared_by_the_fleet() {
    let (a, b) = (mock().await, mock().await);
    let ns = namespace("provider");
    let conf = two_deployments(&a, &b, Some(10), fleet_section(REDIS_URL, &ns, json!({})));
    redis(REDIS_URL);
    let (mut procs, _dirs) = sidecars(&conf, 3);
    let bases: Vec<String> = procs.iter().map(|p| p.base.clone()).collect();
    let started = std::time::Instant::now();
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.extend(flood(&bases, &[10, 10, 10], 2).await);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let elapsed = started.elapsed();
    // Every request was served, by `a` while its key had room, else by `b`.
    assert_eq!(admitted(&answers), answers.len());
    let to_a = posts(&a).len();
    let bound = 10 + (elapsed.as_secs() as usize) / 6 + 1;
    eprintln!(
        "provider rpm 10: {to_a} of {} requests sent to the limited key over 3 sidecars in {elapsed:?} (bound {bound})",
        answers.len()
    );
    assert!(to_a <= bound, "the key got {to_a} requests > {bound}");
    assert!(to_a >= 5, "the key got only {to_a} requests");
    stop_all(&mut procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_seen_by_one_sidecar_keeps_the_others_off() {
    let (a, b) = (mock().await, mock().await);
    let ns = namespace("holds");
    let conf = two_deployments(&a, &b, None, fleet_section(REDIS_URL, &ns, json!({})));
    redis(REDIS_URL);
    let (mut procs, _dirs) = sidecars(&conf, 2);
    a.set_default(Behavior::ok().status(429).retry_after("30"));
    let client = reqwest::Client::new();
    // The first sidecar is told to stay away from `a` for 30 s (and falls
    // back to `b`).
    assert_eq!(ask(&client, &procs[0].base).await.0, 200);
    let told = posts(&a).len();
    assert_eq!(told, 1);
    a.set_default(Behavior::ok());
    // Within a lease interval or two, the second keeps off `a` too.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..5 {
        assert_eq!(ask(&client, &procs[1].base).await.0, 200);
    }
    assert_eq!(
        posts(&a).len(),
        told,
        "another sidecar still sent to a held deployment"
    );
    assert_eq!(posts(&b).len(), 6);
    stop_all(&mut procs);
}
