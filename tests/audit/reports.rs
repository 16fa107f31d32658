//! `collie audit report` says what the records say, in every format.

use super::*;

/// What a report must say of these records, worked out from the records
/// themselves (percentiles: nearest rank, the value at round((n − 1) · p)
/// of the sorted latencies).
fn expected_totals(rs: &[&Record]) -> Value {
    let sum = |f: fn(&Record) -> Option<i64>| rs.iter().filter_map(|r| f(r)).sum::<i64>();
    let count = |f: fn(&Record) -> bool| rs.iter().filter(|r| f(r)).count();
    let mut lat: Vec<f64> = rs.iter().map(|r| r.latency_ms).collect();
    lat.sort_by(f64::total_cmp);
    let pct =
        |p: f64| (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * p).round() as usize]);
    json!({
        "requests": rs.len(),
        "refused": count(|r| r.decision == "refused"),
        "failures": count(|r| r.status >= 400 || r.status == 0 || r.truncated),
        "truncated": count(|r| r.truncated),
        "prompt_tokens": sum(|r| r.prompt_tokens),
        "completion_tokens": sum(|r| r.completion_tokens),
        "total_tokens": sum(|r| r.total_tokens),
        "estimated": count(|r| r.usage_estimated),
        "cost_usd": sum(|r| r.cost_nano) as f64 / 1e9,
        "latency_p50_ms": pct(0.5),
        "latency_p95_ms": pct(0.95),
    })
}

/// Compare a report's totals with the expected ones (numbers with
/// fractions to a few ULPs: JSON parsing need not round-trip exactly).
fn assert_totals(got: &Value, want: &Value, what: &str) {
    for (k, v) in want.as_object().unwrap() {
        if v.is_f64() {
            let (g, w) = (got[k].as_f64().unwrap(), v.as_f64().unwrap());
            assert!((g - w).abs() <= w.abs() * 1e-12, "{what}: {k} {g} vs {w}");
        } else {
            assert_eq!(&got[k], v, "{what}: {k}");
        }
    }
}

/// (name, count) lists of a report, as pairs.
fn pairs(v: &Value) -> Vec<(String, u64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
        .collect()
}

/// Count records by a key, most frequent first (ties by name), top 10.
fn top_of(rs: &[&Record], key: impl Fn(&Record) -> Option<String>) -> Vec<(String, u64)> {
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for r in rs {
        if let Some(k) = key(r) {
            *counts.entry(k).or_default() += 1;
        }
    }
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(10);
    v
}

/// A CSV line split into fields (quoted fields may hold commas and "").
fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_matches_the_records_by_every_measure() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&config(
        &a,
        &b,
        sqlite_audit(&db, json!({"anomalies": {"tenant_requests": 5}})),
    ))
    .await;
    report_traffic(&gw, &a).await;
    let n = 16;
    let all = until_rows(&SinkSpec::Sqlite(db.clone()), n).await;
    drop(gw);
    let sink = format!("sqlite:{}", db.display());
    let recs: Vec<&Record> = all.iter().map(|s| &s.record).collect();
    let r = report_json(&sink, &["--since", "1h"]);

    assert_totals(&r["totals"], &expected_totals(&recs), "totals");
    assert!(
        r["totals"]["latency_p50_ms"].as_f64().unwrap()
            <= r["totals"]["latency_p95_ms"].as_f64().unwrap()
    );
    assert_eq!(r["totals"]["truncated"], 1);
    let models: Vec<String> = r["by_model"].as_object().unwrap().keys().cloned().collect();
    // Refused before the body was read: no model. A model that does not
    // exist is recorded by a fingerprint, never its text (it may be a key).
    let nope = format!(
        "unknown:{}",
        &hex::encode(sha2::Sha256::digest(b"nope"))[..12]
    );
    assert_eq!(models, ["(none)", "gpt", nope.as_str()]);
    for model in &models {
        let of: Vec<&Record> = recs
            .iter()
            .copied()
            .filter(|r| r.requested_model.as_deref().unwrap_or("(none)") == model)
            .collect();
        assert_totals(&r["by_model"][model], &expected_totals(&of), model);
    }
    for tenant in ["alpha", "capped"] {
        let of: Vec<&Record> = recs
            .iter()
            .copied()
            .filter(|r| r.tenant.as_deref() == Some(tenant))
            .collect();
        assert_totals(&r["by_tenant"][tenant], &expected_totals(&of), tenant);
    }
    assert_eq!(r["by_tenant"]["(unauthenticated)"]["requests"], 3);
    let failed: Vec<&Record> = recs.iter().copied().filter(|r| r.failed()).collect();
    let errors = pairs(&r["top_errors"]);
    assert_eq!(
        errors,
        top_of(&failed, |r| Some(
            r.error
                .clone()
                .or(r.rule.clone())
                .unwrap_or_else(|| format!("HTTP {}", r.status))
        ))
    );
    assert_eq!(errors[0], ("invalid_api_key".to_string(), 3));
    assert!(errors.contains(&("stream_interrupted: ConnectionClosed".to_string(), 1)));
    assert!(
        errors.contains(&("quota_exceeded".to_string(), 1)),
        "{errors:?}"
    );
    let sec = &r["security"];
    assert_eq!(
        pairs(&sec["refusals_by_rule"]),
        vec![
            ("invalid_api_key".to_string(), 3),
            ("day.requests".to_string(), 1),
            ("model_not_found".to_string(), 1)
        ]
    );
    assert_eq!(
        pairs(&sec["refusals_by_client"]),
        vec![("127.0.0.1".to_string(), 5)]
    );
    assert_eq!(
        pairs(&sec["auth_refusals_by_claimed_tenant"]),
        vec![("alpha".to_string(), 2), ("(unknown)".to_string(), 1)]
    );
    let anomalies = r["anomalies"].as_array().unwrap();
    assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    assert_eq!(anomalies[0]["rule"], "request_rate");
    assert_eq!(anomalies[0]["tenant"], "alpha");

    // One tenant: its records, and the refusals that claimed its id.
    let alpha = report_json(&sink, &["--since", "1h", "--tenant", "alpha"]);
    let of: Vec<&Record> = recs
        .iter()
        .copied()
        .filter(|r| r.tenant.as_deref() == Some("alpha"))
        .collect();
    assert_totals(&alpha["totals"], &expected_totals(&of), "--tenant alpha");
    assert_eq!(alpha["by_tenant"].as_object().unwrap().len(), 1);
    assert_eq!(
        pairs(&alpha["security"]["auth_refusals_by_claimed_tenant"]),
        vec![("alpha".to_string(), 2)]
    );
    assert_eq!(alpha["anomalies"].as_array().unwrap().len(), 1);
    let capped = report_json(&sink, &["--since", "1h", "--tenant", "capped"]);
    assert_eq!(capped["totals"]["requests"], 2);
    assert_eq!(capped["anomalies"].as_array().unwrap().len(), 0);

    // CSV: the same numbers.
    let text = report_cli(&sink, &["--since", "1h", "--format", "csv"]);
    let lines: Vec<Vec<String>> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(csv_fields)
        .collect();
    let header = &lines[0];
    assert_eq!(header.len(), 14);
    assert!(lines.iter().all(|l| l.len() == header.len()), "{text}");
    let col =
        |row: &Vec<String>, name: &str| row[header.iter().position(|h| h == name).unwrap()].clone();
    let row = |section: &str, name: &str| {
        lines
            .iter()
            .find(|l| l[0] == section && l[1] == name)
            .unwrap_or_else(|| panic!("no {section},{name} in\n{text}"))
            .clone()
    };
    for (section, name, want) in [
        ("total", "all", &r["totals"]),
        ("model", "gpt", &r["by_model"]["gpt"]),
        ("tenant", "alpha", &r["by_tenant"]["alpha"]),
    ] {
        let line = row(section, name);
        for k in [
            "requests",
            "failures",
            "truncated",
            "refused",
            "prompt_tokens",
            "total_tokens",
            "estimated",
        ] {
            assert_eq!(col(&line, k), want[k].to_string(), "{section} {name} {k}");
        }
        let close = |k: &str, eps: f64| {
            (col(&line, k).parse::<f64>().unwrap() - want[k].as_f64().unwrap()).abs() <= eps
        };
        assert!(
            close("cost_usd", 1e-9)
                && close("latency_p50_ms", 5e-4)
                && close("latency_p95_ms", 5e-4)
        );
    }
    assert_eq!(col(&row("error", "invalid_api_key"), "requests"), "3");
    assert_eq!(col(&row("claimed_tenant", "(unknown)"), "requests"), "1");
    assert!(col(&row("anomaly", "request_rate"), "detail").contains("alpha"));

    // Text: every section, with the numbers.
    let text = report_cli(&sink, &["--since", "1h"]);
    for heading in [
        "Totals",
        "By model",
        "By tenant",
        "Top errors",
        "Security",
        "Refusals by rule",
        "Refusals by client address",
        "claimed tenant",
        "Anomalies",
    ] {
        assert!(text.contains(heading), "{heading} missing:\n{text}");
    }
    let total_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("all "))
        .unwrap();
    let words: Vec<&str> = total_line.split_whitespace().collect();
    assert_eq!(words[1], n.to_string(), "{total_line}");
    assert_eq!(
        words[2],
        r["totals"]["failures"].to_string(),
        "{total_line}"
    );

    // The cut-off: records older than --since are left out.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let two_days_ago = now_ms() - 48 * 3_600_000;
    conn.execute(
        "UPDATE audit_records SET ts_ms = ?1 WHERE seq <= 4",
        [two_days_ago],
    )
    .unwrap();
    assert_eq!(
        report_json(&sink, &["--since", "24h"])["totals"]["requests"],
        n - 4
    );
    assert_eq!(
        report_json(&sink, &["--since", "3d"])["totals"]["requests"],
        n
    );
}
