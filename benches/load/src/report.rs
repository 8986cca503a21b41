//! Markdown tables of a run: one per scenario with a ratio column against ssegate, and the
//! issue's targets evaluated on the figures of this same run.

use std::fmt::Write as _;

use crate::scenarios::{Results, Row};

fn ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}×", v / b),
        _ => "–".into(),
    }
}

fn problems(r: &Row) -> String {
    let c = r.counters;
    let mut out = vec![];
    if c.failed > 0 {
        out.push(format!("{} failed", c.failed));
    }
    if c.dropped > 0 {
        out.push(format!("{} dropped", c.dropped));
    }
    if c.gaps > 0 {
        out.push(format!("{} ids missing", c.gaps));
    }
    if c.dups > 0 {
        out.push(format!("{} ids repeated", c.dups));
    }
    if out.is_empty() && !r.errors.is_empty() {
        out.push(r.errors[0].clone());
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

fn find<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.target == name && r.skipped.is_none())
}

/// Latency of `r` minus that of the direct run, p50 and p99, ns (saturating at 0).
fn added(r: &Row, direct: Option<&Row>) -> Option<[i64; 2]> {
    let l = r.latency?;
    let d = direct?.latency?;
    Some([l[0] as i64 - d[0] as i64, l[1] as i64 - d[1] as i64])
}

fn ms_signed(ns: i64) -> String {
    format!("{:+.3}", ns as f64 / 1e6)
}

fn skipped_rows(out: &mut String, rows: &[Row], cols: usize) {
    for r in rows {
        if let Some(why) = &r.skipped {
            // The last line of a failed start is the process's own complaint.
            let first = why
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            let _ = writeln!(
                out,
                "| {} | not run: {} |{}",
                r.target,
                first.replace('|', "/"),
                " |".repeat(cols - 2)
            );
        }
    }
}

/// A table of one figure per target and round (targets that ran in some round), with the
/// row the scenario table shows marked; empty for a single round.
fn per_round(
    title: &str,
    rounds: &[Vec<Row>],
    figure: impl Fn(&Row, &[Row]) -> Option<String>,
) -> String {
    if rounds.len() < 2 {
        return String::new();
    }
    let mut out = format!("#### {title}\n\n| target |");
    for i in 1..=rounds.len() {
        let _ = write!(out, " round {i} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(rounds.len()));
    out.push('\n');
    for (i, first) in rounds[0].iter().enumerate() {
        let cells: Vec<String> = rounds
            .iter()
            .map(|round| match round.get(i) {
                Some(r) if r.skipped.is_none() => figure(r, round).unwrap_or_else(|| "–".into()),
                _ => "not run".into(),
            })
            .collect();
        if cells.iter().all(|c| c == "–" || c == "not run") {
            continue;
        }
        let _ = writeln!(out, "| {} | {} |", first.target, cells.join(" | "));
    }
    out.push('\n');
    out
}

/// The scenario tables.
pub fn tables(res: &Results) -> String {
    let mut out = String::new();
    if !res.bulk.is_empty() {
        let base = find(&res.bulk, "ssegate").and_then(Row::events_per_cpu_s);
        out.push_str("### (a) bulk: events per proxy CPU-second (higher is better)\n\n");
        out.push_str("| target | events / CPU-s | × ssegate | proxy CPU s | events | events/s (wall) | latency p50 / p99 ms | problems |\n|---|---:|---:|---:|---:|---:|---:|---|\n");
        for r in res.bulk.iter().filter(|r| r.skipped.is_none()) {
            let e = r.events_per_cpu_s();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} | {} | {} |",
                r.target,
                opt(e, |v| format!("{:.2} M", v / 1e6)),
                ratio(e, base),
                opt(r.cpu_s, |c| format!("{c:.2}")),
                r.counters.events,
                r.counters.events as f64 / r.wall_s.max(1e-9),
                opt(r.latency, |l| format!("{} / {}", ms(l[0]), ms(l[1]))),
                problems(r)
            );
        }
        skipped_rows(&mut out, &res.bulk, 8);
        out.push('\n');
        out.push_str(&per_round(
            "(a) per round: events per proxy CPU-second, M",
            &res.bulk_rounds,
            |r, _| r.events_per_cpu_s().map(|v| format!("{:.2}", v / 1e6)),
        ));
    }
    if !res.latency.is_empty() {
        let base = find(&res.latency, "ssegate").and_then(Row::cpu_us_per_event);
        let direct = find(&res.latency, "direct");
        out.push_str(
            "### (b) latency: proxy CPU per event (lower is better) and added latency\n\n",
        );
        out.push_str("| target | CPU µs / event | × ssegate | events | p50 ms | p99 ms | max ms | added p50 ms | added p99 ms | first event p50 / p99 ms | problems |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for r in res.latency.iter().filter(|r| r.skipped.is_none()) {
            let c = r.cpu_us_per_event();
            let a = if r.target == "direct" {
                None
            } else {
                added(r, direct)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.target,
                opt(c, |v| format!("{v:.1}")),
                ratio(c, base),
                r.counters.events,
                opt(r.latency, |l| ms(l[0])),
                opt(r.latency, |l| ms(l[1])),
                opt(r.latency, |l| ms(l[2])),
                opt(a, |a| ms_signed(a[0])),
                opt(a, |a| ms_signed(a[1])),
                opt(r.first_event, |f| format!("{} / {}", ms(f[0]), ms(f[1]))),
                problems(r)
            );
        }
        skipped_rows(&mut out, &res.latency, 11);
        out.push('\n');
        out.push_str(&per_round(
            "(b) per round: CPU µs per event",
            &res.latency_rounds,
            |r, _| r.cpu_us_per_event().map(|v| format!("{v:.1}")),
        ));
        out.push_str(&per_round(
            "(b) per round: added p99 ms (the target's p99 minus the same round's direct p99)",
            &res.latency_rounds,
            |r, round| {
                (r.target != "direct")
                    .then(|| added(r, find(round, "direct")))
                    .flatten()
                    .map(|a| ms_signed(a[1]))
            },
        ));
    }
    if !res.scale.is_empty() {
        let base = find(&res.scale, "ssegate").and_then(Row::rss_per_stream);
        out.push_str("### (c) scale: idle streams, memory per stream (lower is better)\n\n");
        out.push_str("| target | streams open / wanted | RSS per stream KiB | × ssegate | RSS before → with streams MiB | time to establish s | problems |\n|---|---:|---:|---:|---:|---:|---|\n");
        for r in res.scale.iter().filter(|r| r.skipped.is_none()) {
            let per = r.rss_per_stream();
            let _ = writeln!(
                out,
                "| {} | {} / {} | {} | {} | {} | {} | {} |",
                r.target,
                r.counters.opened,
                r.wanted,
                opt(per, |v| format!("{:.2}", v / 1024.0)),
                ratio(per, base),
                opt(r.rss_kib, |(a, b)| format!(
                    "{:.1} → {:.1}",
                    a as f64 / 1024.0,
                    b as f64 / 1024.0
                )),
                opt(r.establish_s, |s| format!("{s:.2}")),
                problems(r)
            );
        }
        skipped_rows(&mut out, &res.scale, 7);
        out.push('\n');
    }
    if !res.reload.is_empty() {
        out.push_str("### (d) reload: configuration changes during (b)\n\n");
        out.push_str("| target | changes | reloads seen | streams dropped | ids missing / repeated | p50 ms | p99 ms | max ms | CPU µs / event | problems |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for r in res.reload.iter().filter(|r| r.skipped.is_none()) {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |",
                r.target,
                opt(r.reloads, |(c, _)| c.to_string()),
                opt(r.reloads.and_then(|(_, s)| s), |s| s.to_string()),
                r.counters.dropped,
                r.counters.gaps,
                r.counters.dups,
                opt(r.latency, |l| ms(l[0])),
                opt(r.latency, |l| ms(l[1])),
                opt(r.latency, |l| ms(l[2])),
                opt(r.cpu_us_per_event(), |v| format!("{v:.1}")),
                problems(r)
            );
        }
        skipped_rows(&mut out, &res.reload, 10);
        out.push('\n');
    }
    out
}

/// One target of the issue, evaluated.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    /// What is required.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Some(true): met, Some(false): missed, None: could not be evaluated.
    pub met: Option<bool>,
}

/// The targets evaluated on this run; `min_streams` is the scale goal here.
pub fn verdicts(res: &Results, min_streams: usize) -> Vec<Verdict> {
    let mut v = vec![];
    let na = |target: &str, why: &str| Verdict {
        target: target.into(),
        measured: why.into(),
        met: None,
    };

    let t = "RSS per idle stream ≤ 0.8 × haproxy";
    let s = find(&res.scale, "ssegate").and_then(Row::rss_per_stream);
    let h = find(&res.scale, "haproxy").and_then(Row::rss_per_stream);
    v.push(match (s, h) {
        (Some(s), Some(h)) => Verdict {
            target: t.into(),
            measured: format!(
                "ssegate {:.2} KiB, haproxy {:.2} KiB: {:.2}×",
                s / 1024.0,
                h / 1024.0,
                s / h
            ),
            met: Some(s <= 0.8 * h),
        },
        _ => na(t, "needs ssegate and haproxy in (c)"),
    });

    let t = "CPU per event (b) ≤ 0.7 × nginx";
    let s = find(&res.latency, "ssegate").and_then(Row::cpu_us_per_event);
    let n = find(&res.latency, "nginx").and_then(Row::cpu_us_per_event);
    v.push(match (s, n) {
        (Some(s), Some(n)) => Verdict {
            target: t.into(),
            measured: format!("ssegate {s:.1} µs, nginx {n:.1} µs: {:.2}×", s / n),
            met: Some(s <= 0.7 * n),
        },
        _ => na(t, "needs ssegate and nginx in (b)"),
    });

    let t = "bulk events per CPU-s ≥ 1.2 × best of nginx/haproxy/caddy";
    let s = find(&res.bulk, "ssegate").and_then(Row::events_per_cpu_s);
    let best = ["nginx", "haproxy", "caddy"]
        .iter()
        .filter_map(|n| find(&res.bulk, n).and_then(|r| r.events_per_cpu_s().map(|e| (n, e))))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    v.push(match (s, best) {
        (Some(s), Some((name, b))) => Verdict {
            target: t.into(),
            measured: format!(
                "ssegate {:.2} M, best {name} {:.2} M: {:.2}×",
                s / 1e6,
                b / 1e6,
                s / b
            ),
            met: Some(s >= 1.2 * b),
        },
        _ => na(t, "needs ssegate and another proxy in (a)"),
    });

    let t = "added p99 latency (b) ≤ nginx's";
    let direct = find(&res.latency, "direct");
    let s = find(&res.latency, "ssegate").and_then(|r| added(r, direct));
    let n = find(&res.latency, "nginx").and_then(|r| added(r, direct));
    v.push(match (s, n) {
        (Some(s), Some(n)) => Verdict {
            target: t.into(),
            measured: format!(
                "ssegate {} ms, nginx {} ms{}",
                ms_signed(s[1]),
                ms_signed(n[1]),
                if s[1] < 0 || n[1] < 0 {
                    " (below 0: the direct run's p99 was higher; counted as 0)"
                } else {
                    ""
                }
            ),
            met: Some(s[1] <= n[1].max(0)),
        },
        _ => na(t, "needs ssegate, nginx and direct in (b)"),
    });

    let t = format!("≥ {min_streams} concurrent streams, no errors");
    v.push(match find(&res.scale, "ssegate") {
        Some(r) => {
            let c = r.counters;
            Verdict {
                target: t,
                measured: format!(
                    "{} of {} open, {} failed, {} dropped",
                    c.opened, r.wanted, c.failed, c.dropped
                ),
                met: Some(c.opened as usize >= min_streams && c.failed == 0 && c.dropped == 0),
            }
        }
        None => na(&t, "needs ssegate in (c)"),
    });

    let t = "zero streams dropped in (d)";
    v.push(match find(&res.reload, "ssegate") {
        Some(r) => Verdict {
            target: t.into(),
            measured: format!(
                "{} dropped, {} ids missing, {} repeated; {} of {} changes applied",
                r.counters.dropped,
                r.counters.gaps,
                r.counters.dups,
                opt(r.reloads.and_then(|(_, s)| s), |s| s.to_string()),
                opt(r.reloads, |(c, _)| c.to_string())
            ),
            met: Some(r.counters.dropped == 0 && r.counters.gaps == 0),
        },
        None => na(t, "needs ssegate in (d)"),
    });
    v
}

/// The targets table.
pub fn verdict_table(vs: &[Verdict]) -> String {
    let mut out =
        String::from("### Targets (this run)\n\n| target | measured | result |\n|---|---|---|\n");
    for v in vs {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            v.target,
            v.measured,
            match v.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "n/a",
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Counters;

    fn row(target: &str, events: u64, cpu: f64) -> Row {
        Row {
            target: target.into(),
            counters: Counters {
                events,
                opened: 100,
                ..Counters::default()
            },
            cpu_s: Some(cpu),
            wall_s: 1.0,
            ..Row::default()
        }
    }

    /// A (b) row of 1,000 events: `cpu` seconds (none for direct) and p50/p99/max in ms.
    fn lat(target: &str, cpu: f64, [p50, p99, max]: [f64; 3]) -> Row {
        let mut r = row(target, 1000, cpu);
        r.latency = Some([p50, p99, max].map(|ms| (ms * 1e6) as u64));
        if target == "direct" {
            r.cpu_s = None;
        }
        r
    }

    #[test]
    fn ratios_are_against_ssegate_and_targets_are_judged() {
        let bulk = vec![
            row("ssegate", 10_000_000, 1.0),
            row("nginx", 4_000_000, 1.0),
        ];
        let latency = vec![
            lat("ssegate", 0.02, [2.0, 5.0, 9.0]),
            lat("direct", 0.0, [1.9, 1.0, 2.0]),
            lat("nginx", 0.04, [2.1, 11.0, 20.0]),
        ];
        let mut sc = row("ssegate", 0, 0.0);
        sc.rss_kib = Some((1000, 1000 + 400));
        let mut hc = row("haproxy", 0, 0.0);
        hc.rss_kib = Some((1000, 1000 + 480));
        let scale = vec![sc, hc];
        let res = Results {
            bulk,
            latency,
            scale,
            ..Results::default()
        };
        let t = tables(&res);
        assert!(t.contains("| nginx | 4.00 M | 0.40× |"), "{t}");
        assert!(t.contains("| nginx | 40.0 | 2.00× |"), "{t}");
        assert!(t.contains("| ssegate | 100 / 0 | 4.00 |"), "{t}");
        let v = verdicts(&res, 100);
        assert_eq!(v[0].met, Some(false), "{:?}", v[0]); // 400/480 = 0.83 > 0.8
        assert_eq!(v[1].met, Some(true)); // 20 µs vs 40 µs
        assert_eq!(v[2].met, Some(true)); // 10 M vs 4 M
        assert_eq!(v[3].met, Some(true)); // +4 ms vs +10 ms
        assert_eq!(v[4].met, Some(true));
        assert_eq!(v[5].met, None);
        assert!(verdict_table(&v).contains("**missed**"));
    }

    #[test]
    fn rounds_get_their_own_tables_and_added_p99_pairs_each_round_with_its_direct_run() {
        let rounds = vec![
            vec![
                lat("ssegate", 0.030, [0.1, 3.0, 20.0]),
                lat("direct", 0.0, [0.1, 1.0, 20.0]),
                lat("nginx", 0.020, [0.1, 2.0, 20.0]),
            ],
            vec![
                lat("ssegate", 0.010, [0.1, 9.0, 20.0]),
                lat("direct", 0.0, [0.1, 8.0, 20.0]),
                lat("nginx", 0.040, [0.1, 9.0, 20.0]),
            ],
        ];
        let res = Results {
            latency: vec![lat("ssegate", 0.030, [0.1, 3.0, 20.0])],
            latency_rounds: rounds,
            ..Results::default()
        };
        let t = tables(&res);
        assert!(t.contains("#### (b) per round: CPU µs per event"), "{t}");
        assert!(t.contains("| ssegate | 30.0 | 10.0 |"), "{t}");
        assert!(t.contains("| nginx | 20.0 | 40.0 |"), "{t}");
        // Each round against its own direct run: +2 then +1 for ssegate, +1 then +1 for nginx.
        assert!(t.contains("| ssegate | +2.000 | +1.000 |"), "{t}");
        assert!(t.contains("| nginx | +1.000 | +1.000 |"), "{t}");
        // Direct has no figure of its own in either table.
        assert!(!t.contains("| direct |"), "{t}");
        // One round: no per-round tables.
        let one = Results {
            latency_rounds: vec![vec![lat("ssegate", 0.030, [0.1, 3.0, 20.0])]],
            ..res
        };
        assert!(!tables(&one).contains("per round"));
    }

    #[test]
    fn added_p99_below_zero_counts_as_zero_and_says_so() {
        let d = lat("direct", 0.0, [1.0, 4.0, 9.0]);
        let n = lat("nginx", 0.02, [2.0, 1.0, 9.0]);
        let res = Results {
            latency: vec![lat("ssegate", 0.02, [2.0, 3.0, 9.0]), d.clone(), n.clone()],
            ..Results::default()
        };
        let v = &verdicts(&res, 100)[3];
        assert_eq!(v.met, Some(true), "{v:?}"); // -1 ms vs -3 ms: both add nothing measurable
        assert!(
            v.measured
                .contains("ssegate -1.000 ms, nginx -3.000 ms (below 0"),
            "{v:?}"
        );
        // ssegate adding latency where nginx adds none is missed.
        let res = Results {
            latency: vec![lat("ssegate", 0.02, [2.0, 5.0, 9.0]), d, n],
            ..Results::default()
        };
        let v = &verdicts(&res, 100)[3];
        assert_eq!(v.met, Some(false), "{v:?}");
        assert!(
            v.measured.starts_with("ssegate +1.000 ms, nginx -3.000 ms"),
            "{v:?}"
        );
    }

    #[test]
    fn problems_are_listed_and_skips_shown() {
        let mut r = row("caddy", 1, 1.0);
        r.counters.dropped = 2;
        r.counters.gaps = 3;
        assert_eq!(problems(&r), "2 dropped, 3 ids missing");
        let res = Results {
            bulk: vec![Row {
                target: "haproxy".into(),
                skipped: Some("not installed".into()),
                ..Row::default()
            }],
            ..Results::default()
        };
        assert!(tables(&res).contains("| haproxy | not run: not installed |"));
    }
}
