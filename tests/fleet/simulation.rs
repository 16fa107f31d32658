//! The lease script under a virtual clock, in the machine's Redis: a lease
//! that expires while its sidecar is away, calls made again after their
//! answers were lost, and a simulated fleet of a hundred sidecars with
//! skewed demand, slow calls, lost answers, partitions and deaths, where the
//! fleet never admits past the limit.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SCRIPT: &str = include_str!("../../src/quota/fleet/lease.lua");

/// One budget key, requests only (tokens and USD unlimited): the
/// sidecar's lease, the fleet's use and what all sidecars hold. `total`:
/// the sidecar's use in the window; `acked`: its total at the last call
/// whose answer it had.
#[allow(clippy::too_many_arguments, reason = "the script's arguments")]
fn lease(
    c: &mut redis::Connection,
    key: &str,
    sid: &str,
    now_ms: u64,
    ttl_ms: u64,
    limit: i64,
    (total, acked): (i64, i64),
    want: i64,
    need: i64,
) -> (i64, i64, i64) {
    let out: Vec<i64> = redis::Script::new(SCRIPT)
        .key(key)
        .arg(sid)
        .arg(now_ms)
        .arg(ttl_ms)
        .arg(1)
        .arg(0)
        .arg(3600)
        .arg(3600)
        .arg(
            &[
                limit, -1, -1, total, 0, 0, acked, 0, 0, want, 0, 0, need, 0, 0,
            ][..],
        )
        .invoke(c)
        .unwrap();
    (out[0], out[3], out[6])
}

#[test]
fn an_expired_lease_counts_as_used_until_its_sidecar_reports() {
    let mut c = redis(REDIS_URL);
    let key = format!("{}:b", namespace("expiry"));
    let ttl = 2_000;
    // s1 leases 30 of 100; s2 asks for everything and gets a fair part of
    // the rest.
    assert_eq!(
        lease(&mut c, &key, "s1", 1_000, ttl, 100, (0, 0), 30, 0),
        (30, 0, 30)
    );
    assert_eq!(
        lease(&mut c, &key, "s2", 1_000, ttl, 100, (0, 0), 100, 0),
        (35, 0, 65)
    );
    // Before s1's ttl: its lease holds; s2 grows by a fair part of what
    // is free (half of 35, two sidecars live).
    assert_eq!(
        lease(&mut c, &key, "s2", 2_999, ttl, 100, (0, 0), 100, 0).0,
        53
    );
    // Past s1's ttl: its lease counts as used (it may have been spent),
    // and what was free goes to s2 — never more than the limit in all.
    let (l, used, leased) = lease(&mut c, &key, "s2", 3_001, ttl, 100, (0, 0), 100, 0);
    assert_eq!((l, used, leased), (70, 30, 70));
    assert!(used + leased <= 100);
    // s1 comes back: it used 10 of its 30 and has nothing in flight; the
    // 20 it did not use go back to the fleet.
    let (l, used, _) = lease(&mut c, &key, "s1", 3_500, ttl, 100, (10, 0), 0, 0);
    assert_eq!((l, used), (0, 10));
    assert_eq!(
        lease(&mut c, &key, "s2", 3_600, ttl, 100, (0, 0), 100, 0),
        (80, 10, 80)
    );
    let _: () = redis::cmd("DEL").arg(&key).query(&mut c).unwrap();
}

#[test]
fn a_call_made_again_after_its_answer_was_lost_counts_its_use_once() {
    let mut c = redis(REDIS_URL);
    let key = format!("{}:b", namespace("lost"));
    let ttl = 2_000;
    let used = |c: &mut redis::Connection, sid: &str, now: u64, totals: (i64, i64), want: i64| {
        lease(c, &key, sid, now, ttl, 100, totals, want, 0).1
    };
    // s1 used 10 and reports it; the answer is lost (a deadline passed
    // while Redis applied the call), so s1 has no total acknowledged.
    assert_eq!(used(&mut c, "s1", 1_000, (10, 0), 20), 10);
    // Its next call carries the same 10 and 5 more: 15 in all, not 25.
    assert_eq!(used(&mut c, "s1", 1_200, (15, 0), 20), 15);
    // The same call once more (its answer lost too): nothing new.
    assert_eq!(used(&mut c, "s1", 1_300, (15, 0), 20), 15);
    // Answered at last: s1 knows 15 were counted.
    assert_eq!(used(&mut c, "s1", 1_400, (15, 15), 20), 15);
    // s2 holds nothing (it wants nothing more) and reports 5; its answer is
    // lost. s1's call next keeps s2's record (the total counted for s2),
    // though it holds no lease.
    assert_eq!(used(&mut c, "s2", 1_500, (5, 0), 0), 20);
    assert_eq!(used(&mut c, "s1", 1_600, (15, 15), 20), 20);
    assert_eq!(used(&mut c, "s2", 1_700, (5, 0), 0), 20);
    // An hour past its lease s2's record goes (its total with it); a
    // sidecar back after that counts from the total it last heard of.
    let later = 1_700 + ttl + 3_600_000 + 1;
    assert_eq!(used(&mut c, "s1", later, (15, 15), 0), 20);
    let fields: Vec<String> = redis::cmd("HKEYS").arg(&key).query(&mut c).unwrap();
    assert!(!fields.contains(&"s:s2".to_string()), "{fields:?}");
    assert_eq!(used(&mut c, "s2", later + 1, (7, 5), 0), 22);
    let _: () = redis::cmd("DEL").arg(&key).query(&mut c).unwrap();
}

/// One simulated sidecar: a local ledger for one budget dimension.
struct Sim {
    sid: String,
    /// Settled use, and what it reported of it.
    used: i64,
    reported: i64,
    /// What it may have used in all: reported use plus its lease.
    allowance: i64,
    /// Its leases end here (the start of the last call that answered,
    /// plus the ttl).
    valid_until: u64,
    /// Demand per step (requests), and what it asked since the last call.
    rate: f64,
    demand: i64,
    dead: bool,
    /// No answer from Redis until then.
    cut_off_until: u64,
}

#[test]
fn a_hundred_sidecars_never_pass_the_limit() {
    let mut c = redis(REDIS_URL);
    let (step, interval, ttl) = (100u64, 1_000u64, 5_000u64);
    let limit: i64 = 5_000;
    for seed in 0..3u64 {
        let key = format!("{}:b", namespace("sim"));
        let mut rng = StdRng::seed_from_u64(seed);
        // Skewed demand: a few hot sidecars, a long tail (Zipf-like), 80
        // requests per second in all, so the limit runs out mid-run.
        let weights: Vec<f64> = (1..=100).map(|i| 1.0 / f64::from(i)).collect();
        let total: f64 = weights.iter().sum();
        let mut fleet: Vec<Sim> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Sim {
                sid: format!("s{i}"),
                used: 0,
                reported: 0,
                allowance: 0,
                valid_until: 0,
                rate: 8.0 * w / total,
                demand: 0,
                dead: false,
                cut_off_until: 0,
            })
            .collect();
        let (mut calls, mut wanted, mut worst) = (0u64, 0i64, 0i64);
        let mut now = 1_000u64;
        while now < 1_000 + 120_000 {
            for (i, s) in fleet.iter_mut().enumerate() {
                if s.dead {
                    continue;
                }
                // Faults: a few sidecars die, some are cut off for a while.
                if rng.gen_bool(0.0002) {
                    s.dead = true;
                    continue;
                }
                if rng.gen_bool(0.001) {
                    s.cut_off_until = now + rng.gen_range(1_000..15_000);
                }
                let mut arrivals = s.rate.floor() as i64;
                if rng.gen_bool(s.rate.fract()) {
                    arrivals += 1;
                }
                wanted += arrivals;
                let mut refused = false;
                for _ in 0..arrivals {
                    s.demand += 1;
                    if now < s.valid_until && s.used < s.allowance {
                        s.used += 1;
                    } else {
                        refused = true;
                    }
                }
                let due = (now / step + i as u64).is_multiple_of(interval / step);
                if !(due || refused) {
                    continue;
                }
                if now < s.cut_off_until {
                    continue;
                }
                // A slow answer: the authority sees the call later than the
                // sidecar made it.
                let at = now
                    + if rng.gen_bool(0.05) {
                        rng.gen_range(0..400)
                    } else {
                        0
                    };
                let want = 2 * s.demand + i64::from(refused);
                let totals = (s.used, s.reported);
                let (l, _, _) = lease(&mut c, &key, &s.sid, at, ttl, limit, totals, want, 0);
                calls += 1;
                // A lost answer: Redis applied the call, the sidecar learns
                // nothing of it and reports the same use again next time.
                if rng.gen_bool(0.03) {
                    continue;
                }
                s.reported = s.used;
                s.allowance = s.used + l;
                s.valid_until = now + ttl;
                s.demand = 0;
            }
            let admitted: i64 = fleet.iter().map(|s| s.used).sum();
            worst = worst.max(admitted);
            assert!(
                admitted <= limit,
                "seed {seed}: {admitted} admitted of {limit} at {now} ms"
            );
            now += step;
        }
        let admitted: i64 = fleet.iter().map(|s| s.used).sum();
        let dead = fleet.iter().filter(|s| s.dead).count();
        eprintln!(
            "simulation seed {seed}: 100 sidecars ({dead} died), {wanted} requests wanted, \
             {admitted} admitted of {limit} ({:.1} % of the limit), {calls} lease calls",
            100.0 * admitted as f64 / limit as f64
        );
        assert!(worst <= limit);
        // Most of the limit reaches the demand: what is missing is held by
        // sidecars that died or are cut off.
        assert!(
            admitted as f64 >= 0.9 * limit as f64,
            "{admitted} of {limit}"
        );
        let _: () = redis::cmd("DEL").arg(&key).query(&mut c).unwrap();
    }
}
