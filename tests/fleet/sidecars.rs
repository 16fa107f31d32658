//! Three sidecars, one tenant, one Redis: the fleet admits what one
//! sidecar alone would.

use super::*;

/// Waves of requests spread unevenly over the sidecars (60 %, 30 %, 10 %),
/// with a pause of two lease intervals between waves, so that leases an
/// idle sidecar gives back reach the busy ones while demand lasts.
async fn waves(bases: &[String], total: usize, waves: usize) -> Vec<(u16, Option<String>)> {
    let per_wave = total / waves;
    let counts = [per_wave * 6 / 10, per_wave * 3 / 10, per_wave / 10];
    let mut all = Vec::new();
    for _ in 0..waves {
        all.extend(flood(bases, &counts, 8).await);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    all
}

fn bases(procs: &[Process]) -> Vec<String> {
    procs.iter().map(|p| p.base.clone()).collect()
}

/// The tenant's fleet-wide figure for a window, from one sidecar's
/// `/v1/collie/quota` (`fleet_used`, as Redis last said).
async fn fleet_used(base: &str, window: &str) -> Option<f64> {
    let v: Value = Remote::new(base)
        .get_as("/v1/collie/quota", "alpha", ALPHA_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["scopes"][0]["windows"]
        .as_array()?
        .iter()
        .find(|w| w["window"] == window)?["fleet_used"]
        .as_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sidecars_admit_exactly_the_day_budget() {
    let a = mock().await;
    let ns = namespace("day");
    let conf = fleet_config(
        &a,
        json!({"requests_per_day": 100}),
        fleet_section(REDIS_URL, &ns, json!({})),
    );
    redis(REDIS_URL);
    let (mut procs, _dirs) = sidecars(&conf, 3);
    let answers = waves(&bases(&procs), 1000, 10).await;
    let ok = admitted(&answers);
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    // Every refusal is the day budget's, as a single sidecar would say it.
    assert!(
        refused
            .iter()
            .all(|(s, c)| *s == 429 && c.as_deref() == Some("quota_exceeded")),
        "{:?}",
        refused.iter().take(5).collect::<Vec<_>>()
    );
    eprintln!("day budget: {ok} of 1000 requests admitted over 3 sidecars (limit 100)");
    assert_eq!(
        ok, 100,
        "admitted {ok} of 1000 against requests_per_day: 100"
    );
    assert_eq!(posts(&a).len(), 100);
    // Each sidecar reports the fleet's use, not only its own.
    let base = procs[2].base.clone();
    assert!(
        until(Duration::from_secs(5), || async {
            fleet_used(&base, "day.requests").await == Some(100.0)
        })
        .await,
        "the least busy sidecar does not show the fleet's 100 requests"
    );
    stop_all(&mut procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_is_never_passed_when_demand_is_short_of_it() {
    let a = mock().await;
    let ns = namespace("short");
    let conf = fleet_config(
        &a,
        json!({"requests_per_day": 100}),
        fleet_section(REDIS_URL, &ns, json!({})),
    );
    redis(REDIS_URL);
    let (mut procs, _dirs) = sidecars(&conf, 3);
    // 90 requests at once, all concurrently: every one fits.
    let answers = flood(&bases(&procs), &[50, 30, 10], 10).await;
    assert_eq!(admitted(&answers), 90);
    stop_all(&mut procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_minute_rate_is_shared_not_multiplied() {
    let a = mock().await;
    let ns = namespace("rpm");
    let conf = fleet_config(
        &a,
        json!({"rpm": 60}),
        fleet_section(REDIS_URL, &ns, json!({})),
    );
    redis(REDIS_URL);
    let (mut procs, _dirs) = sidecars(&conf, 3);
    let started = std::time::Instant::now();
    let answers = flood(&bases(&procs), &[300, 150, 50], 8).await;
    let elapsed = started.elapsed();
    let ok = admitted(&answers);
    // One sidecar alone admits its burst (60) plus what refills while the
    // test runs (one per second); three must not admit more.
    let bound = 60 + elapsed.as_secs() as usize + 1;
    eprintln!("rpm 60: {ok} of 500 admitted over 3 sidecars in {elapsed:?} (bound {bound})");
    assert!(
        ok <= bound,
        "admitted {ok} > {bound} with rpm 60 across 3 sidecars"
    );
    assert!(
        ok >= 30,
        "admitted only {ok}: the fleet left most of the rate unused"
    );
    let limited = answers
        .iter()
        .filter(|(s, c)| *s == 429 && c.as_deref() == Some("rate_limited"))
        .count();
    assert_eq!(ok + limited, answers.len());
    stop_all(&mut procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_hot_sidecar_can_use_the_whole_rate() {
    let a = mock().await;
    let ns = namespace("hot");
    let conf = fleet_config(
        &a,
        json!({"rpm": 60}),
        fleet_section(REDIS_URL, &ns, json!({})),
    );
    redis(REDIS_URL);
    let (mut procs, _dirs) = sidecars(&conf, 3);
    // The other two run and refresh their (empty) shares, and ask nothing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let answers = flood(&bases(&procs), &[100, 0, 0], 4).await;
    let ok = admitted(&answers);
    eprintln!("rpm 60, one busy sidecar of 3: {ok} of 100 admitted");
    assert!(
        (60..=62).contains(&ok),
        "a lone busy sidecar admitted {ok} of rpm 60"
    );
    stop_all(&mut procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_usd_budget_is_shared() {
    let a = mock().await;
    let ns = namespace("usd");
    let conf = fleet_config(
        &a,
        json!({"usd_per_day": 0.001}),
        fleet_section(REDIS_URL, &ns, json!({})),
    );
    redis(REDIS_URL);
    let (mut procs, _dirs) = sidecars(&conf, 3);
    let answers = waves(&bases(&procs), 300, 5).await;
    let ok = admitted(&answers);
    assert!(ok > 0);
    let base = procs[0].base.clone();
    assert!(
        until(Duration::from_secs(5), || async {
            fleet_used(&base, "day.usd").await.is_some_and(|u| u > 0.0)
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let used = fleet_used(&base, "day.usd").await.unwrap();
    eprintln!("usd_per_day 0.001: {ok} of 300 admitted, the fleet spent ${used}");
    assert!(used <= 0.001 + 1e-12, "the fleet spent ${used} of $0.001");
    // What one request costs here: the mock's usage at the config's prices.
    let one = used / ok as f64;
    assert!(
        0.001 - used < 3.0 * one,
        "the fleet stopped at ${used} of $0.001 with requests of ${one} each"
    );
    stop_all(&mut procs);
}

/// The limit a sidecar reports for the tenant's day.requests window.
async fn day_limit(base: &str) -> f64 {
    let v: Value = Remote::new(base)
        .get_as("/v1/collie/quota", "alpha", ALPHA_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["scopes"][0]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == "day.requests")
        .unwrap()["limit"]
        .as_f64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_may_change_limits_but_not_the_fleet() {
    let a = mock().await;
    let ns = namespace("reload");
    let fleet = fleet_section(REDIS_URL, &ns, json!({}));
    let conf = fleet_config(&a, json!({"requests_per_day": 100}), fleet.clone());
    redis(REDIS_URL);
    let (mut procs, dirs) = sidecars(&conf, 1);
    let base = procs[0].base.clone();
    let path = dirs[0].path().join("collie.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let hup = |p: &Process| {
        Command::new("kill")
            .arg("-HUP")
            .arg(p.child.id().to_string())
            .status()
            .unwrap();
    };
    // A new limit, same fleet: taken.
    std::fs::write(
        &path,
        text.replace("requests_per_day: 100", "requests_per_day: 200"),
    )
    .unwrap();
    hup(&procs[0]);
    assert!(
        until(Duration::from_secs(5), || async {
            day_limit(&base).await == 200.0
        })
        .await
    );
    // Another namespace (and another limit): the whole reload is refused.
    let moved = text
        .replace("requests_per_day: 100", "requests_per_day: 300")
        .replace(&ns, "elsewhere");
    std::fs::write(&path, moved).unwrap();
    hup(&procs[0]);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(day_limit(&base).await, 200.0);
    assert_eq!(ask(&reqwest::Client::new(), &base).await.0, 200);
    stop_all(&mut procs);
}
